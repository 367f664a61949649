"""Every collective and message of one training step, per rank and per process group.

A step (``minipar/train.py``) talks on three communicators of the grid, and the planner lists
each call with its size, so that (a) the bytes equal the communicators' traffic counters, and
(b) the α–β model can time each call. Per micro-batch, with x of shape (b, s, h) the activation:

    tp group (Shoeybi et al. 2019; Korthikanti et al. 2022 for SP)
      embedding   forward: allreduce x (SP: reduce-scatter x); backward under SP: all-gather x
      each block  forward: 2 allreduces of x (SP: 2 all-gathers + 2 reduce-scatters)
                  backward: 2 allreduces of x (SP: 2 reduce-scatters + 2 all-gathers)
      head        forward: 3 allreduces of b·s (max, Σexp, target logit; the vocab-parallel loss)
                  and under SP an all-gather of x; backward: allreduce x (SP: reduce-scatter x)
      recomputation and ZeRO-3 run the forward again before the backward: its calls again
      per step: SP's sum of the sequence-sharded gradients; the gradient norm (1 float64)
    pp group      per micro-batch and chunk boundary, an Isend of x forward and of dL/dx
                  backward; per step a broadcast of the loss and the gradient norm (1 float64)
    dp group      plain: an allreduce per gradient bucket; ZeRO: a reduce-scatter per unit (stages
                  2-3: per unit and micro-batch), and
                  an all-gather per unit after the step (stages 1-2) or per piece use (stage 3);
                  per step the loss average (1 float64) and, under ZeRO, the gradient norm.

MPI does not report what its built-in collectives move, so the counters book the textbook ring
(allreduce $2(N−1)/N·n$, all-gather and reduce-scatter $(N−1)/N·n$) and binomial-tree (broadcast)
volumes; ``minipar.comm.traffic.modelled_traffic`` is that one formula, used here too.
The tied-embedding sum between the first and last stage runs on a two-rank sub-communicator
of the pp group (parallel/pipeline/partition.py), so its bytes are listed as group "pp-ends".
"""
from dataclasses import dataclass

from minipar.plan.model import part_length
from minipar.plan.strategy import rank_chunks, rank_parameters, rank_pieces, zero_units


@dataclass(frozen=True)
class Call:
    """One kind of call on one group: ``count`` calls of ``elements`` elements of ``itemsize`` bytes.

    ``per`` says when it happens (for the time model): "microbatch" calls sit on the pipeline's
    critical path, "step" calls happen once per step (gradient sync, optimizer)."""

    group: str
    kind: str  # allreduce | allgather | reduce_scatter | broadcast | send
    elements: int  # the n of the cost formulas: the full (gathered) size for all-gather / reduce-scatter
    itemsize: int
    count: int = 1
    per: str = "microbatch"
    root: int = 0


def _group_size(strategy, group):
    return {"dp": strategy.dp, "tp": strategy.tp, "pp": strategy.pp, "pp-ends": 2, "cp": strategy.cp,
            "ep": strategy.ep}[group]


def bytes_sent(call, rank, size):
    """Bytes this rank sends for ``call`` (× count), as the counters book them."""
    from minipar.comm.traffic import modelled_traffic

    if call.kind == "send":
        return call.count * call.elements * call.itemsize
    one = modelled_traffic(call.kind, rank, size, call.elements, call.itemsize, call.root)
    return call.count * int(one.bytes_sent)


def step_calls(model, strategy, stage):
    """Every call the rank of pipeline ``stage`` makes in one step (any dp and tp coordinate)."""
    return _tensor_parallel_calls(model, strategy, stage) + _pipeline_calls(model, strategy, stage) + \
        _data_parallel_calls(model, strategy, stage) + _context_and_expert_calls(model, strategy, stage)


def _context_and_expert_calls(model, strategy, stage):
    """Planned, not yet counted against minipar's counters (their issues add the engine's side).

    Context parallelism (ring attention, Liu et al. 2023): per layer and micro-batch, cp − 1 sends
    of a K and a V block (b·(s/cp)·g·d/t elements each) forward; backward sends K, V and dK, dV.
    Experts (GShard, Lepikhin et al. 2020): per MoE layer and micro-batch, an all-to-all to dispatch
    and one to combine, k·T·h elements each, forward and again backward."""
    e, m, b, t = strategy.dtype_bytes, strategy.microbatches, strategy.micro_batch, strategy.tp
    layers = sum(piece == "block" for _, piece in rank_pieces(model, strategy, stage))
    tokens = b * model.block_size // strategy.cp
    calls = []
    if strategy.cp > 1:
        block = tokens * model.kv_width // t
        passes = _forward_passes(strategy)
        calls.append(Call("cp", "send", block, e, 2 * (strategy.cp - 1) * layers * m * (passes + 2)))
    if model.experts > 1 and strategy.ep > 1:
        routed = model.top_k * tokens * model.n_embd // (t if strategy.sequence_parallel else 1)
        calls.append(Call("ep", "alltoall", routed, e, 2 * layers * m * (_forward_passes(strategy) + 1)))
    return calls


def _forward_passes(strategy):
    """How many times each forward runs per micro-batch: 1, +1 recomputation, +1 ZeRO-3's rerun."""
    return 1 + int(strategy.recompute == "full") + int(strategy.effective_zero == 3)


def _tensor_parallel_calls(model, strategy, stage):
    e, m, b = strategy.dtype_bytes, strategy.microbatches, strategy.micro_batch
    s, h, sp = model.block_size // strategy.cp, model.n_embd, strategy.sequence_parallel
    x = b * s * h
    forward, backward = [], []  # (kind, elements) per micro-batch
    pieces = [piece for _, piece in rank_pieces(model, strategy, stage)]
    for piece in pieces:
        if piece == "embedding":
            forward += [("reduce_scatter" if sp else "allreduce", x)]
            backward += [("allgather", x)] if sp else []
        elif piece == "block":
            forward += [("allgather", x), ("reduce_scatter", x)] * 2 if sp else [("allreduce", x)] * 2
            backward += [("reduce_scatter", x), ("allgather", x)] * 2 if sp else [("allreduce", x)] * 2
        else:
            forward += ([("allgather", x)] if sp else []) + [("allreduce", b * s)] * 3
            backward += [("reduce_scatter" if sp else "allreduce", x)]
    passes = _forward_passes(strategy)
    calls = [Call("tp", kind, n, e, m * passes) for kind, n in forward]
    calls += [Call("tp", kind, n, e, m) for kind, n in backward]
    if sp:
        calls.append(Call("tp", "allreduce", _sequence_sharded_elements(model, strategy, stage), e, per="step"))
    calls.append(Call("tp", "allreduce", 1, 8, per="step"))  # the gradient norm, float64
    return calls


def _sequence_sharded_elements(model, strategy, stage):
    """Gradients SP sums over tp: LayerNorms, the position embedding, row-parallel biases (padded
    to ZeRO parts when ZeRO is on, as it sums the parts)."""
    names = ("norm.weight", "norm.bias", "embedding.position.weight", "attention.output.bias", "mlp.output.bias")
    sizes = [n for _, name, n in rank_parameters(model, strategy, stage) if name.endswith(names)]
    if strategy.effective_zero:
        return sum(part_length(n, strategy.dp) for n in sizes)
    return sum(sizes)


def _pipeline_calls(model, strategy, stage):
    if strategy.pp == 1:
        return [Call("pp", "broadcast", 1, 8, per="step"), Call("pp", "allreduce", 1, 8, per="step")]
    e, m, last_chunk = strategy.dtype_bytes, strategy.microbatches, strategy.chunks - 1
    s = model.block_size // strategy.cp // (strategy.tp if strategy.sequence_parallel else 1)
    x = strategy.micro_batch * s * model.n_embd
    chunks = rank_chunks(strategy, stage)
    sends = m * (sum(c != last_chunk for c in chunks) + sum(c != 0 for c in chunks))
    calls = [Call("pp", "send", x, e, sends),
             Call("pp", "broadcast", 1, 8, per="step", root=strategy.pp - 1),  # the loss, from the last stage
             Call("pp", "allreduce", 1, 8, per="step")]  # the gradient norm
    if model.tied and stage in (0, strategy.pp - 1):  # the tied embedding's two copies, summed
        token = model.vocab_size // strategy.tp * model.n_embd
        n = part_length(token, strategy.dp) if strategy.effective_zero else token
        calls.append(Call("pp-ends", "allreduce", n, e, per="step"))
    return calls


def _data_parallel_calls(model, strategy, stage):
    e, zero, dp = strategy.dtype_bytes, strategy.effective_zero, strategy.dp
    calls = [Call("dp", "allreduce", 1, 8, per="step")]  # the loss average
    if zero == 0:
        return [Call("dp", "allreduce", n, e, per="step") for n in _buckets(model, strategy, stage)] + calls
    calls.append(Call("dp", "allreduce", 1, 8, per="step"))  # the gradient norm sums the parts
    units = zero_units(model, strategy, stage)
    for users, unit in units:
        rows = dp * sum(part_length(n, dp) for n in unit)
        if zero == 1:  # once, after the last micro-batch
            calls.append(Call("dp", "reduce_scatter", rows, e, per="step"))
        elif strategy.engine == "minipar":  # stages 2-3 after every micro-batch (parallel/zero.py)
            calls.append(Call("dp", "reduce_scatter", rows, e, strategy.microbatches))
        else:  # the papers' runs: once per step, as the planner's calibration against them assumes
            calls.append(Call("dp", "reduce_scatter", rows, e, per="step"))
        if zero < 3:
            calls.append(Call("dp", "allgather", rows, e, per="step"))
        else:  # gathered for every forward (and rerun) and every backward of each piece using it
            # forward, recomputation, and the backward's rerun: one gather each (_forward_passes)
            # (mixed precision, DeepSpeed's way: the forward's gather and the backward's, which the
            # recomputation inside it shares: ZeRO's 3Ψ per step with the reduce-scatter)
            passes = _forward_passes(strategy) if strategy.precision == "fp32" else 2
            gathers = len(users) * strategy.microbatches * passes
            calls.append(Call("dp", "allgather", rows, e, gathers))
    return calls


def _buckets(model, strategy, stage):
    """Bucket sizes in elements, as DataParallel packs them: reverse parameter order, a new
    bucket when the next parameter would pass ``bucket_bytes``."""
    e, buckets = strategy.dtype_bytes, []
    for _, _, n in reversed(rank_parameters(model, strategy, stage)):
        if not buckets or (buckets[-1] + n) * e > strategy.bucket_bytes:
            buckets.append(0)
        buckets[-1] += n
    return buckets


def coordinates(strategy, rank):
    """(dp, tp, pp) coordinates of a world rank: rank = tp_rank + tp·(dp_rank + dp·pp_rank)."""
    tp_rank = rank % strategy.tp
    dp_rank = rank // strategy.tp % strategy.dp
    return dp_rank, tp_rank, rank // (strategy.tp * strategy.dp)


def bytes_per_group(model, strategy, rank):
    """{group: bytes this world rank sends per step}, as its communicators' counters read."""
    dp_rank, tp_rank, stage = coordinates(strategy, rank)
    position = {"dp": dp_rank, "tp": tp_rank, "pp": stage, "pp-ends": 0 if stage == 0 else 1}
    totals = {"dp": 0, "tp": 0, "pp": 0, "pp-ends": 0}
    for call in step_calls(model, strategy, stage):
        if call.group not in totals:
            continue  # cp and ep: not in minipar's engine yet
        totals[call.group] += bytes_sent(call, position[call.group], _group_size(strategy, call.group))
    return totals
