"""Checks for minipar.parallel.context_parallel, run on every rank by tests/test_context_parallel.py.

The cp group is the whole world. Everything runs in float64 and is compared with one process
on the same data, which every rank builds from the same seed:
  - attention alone: this rank's slice of the single-process output and of dQ, dK, dV (for a
    fixed random weighting of the output), plus the bytes each rank sent and the work it did;
  - a whole GPT: the mean over cp of the ranks' losses, the gathered logits, and every parameter
    gradient averaged over cp.
Rounding differs (the merge reorders the softmax sums), so values compare at rtol 1e-10; an
absolute 1e-13 on O(1) gradients covers entries that are exactly 0 in one process (the first
query sees one key, so its dQ is 0) and ~1e-16 here, where rowsum(dP * P) comes as dO . O.
"""
import numpy as np
from mpi4py import MPI

from minipar import ops
from minipar.backend import from_host, xp
from minipar.comm import Communicator
from minipar.nn.gpt import GPT, GPTConfig
from minipar.parallel.context_parallel import AttentionWork, token_positions
from minipar.parallel.context_parallel_model import (
    context_parallel_attention,
    gather_tokens,
    single_process_modules,
    split_tokens,
    use_context_parallel,
)
from minipar.tensor import Tensor
from tests.mpi_bodies.comparisons import Comparisons

RTOL = 1e-10
ATOL = 1e-13
ATTENTION_SHAPE = (2, 3, 32, 4)  # (B, H, T, d); T splits into 2N chunks for N up to 8
MODEL = dict(vocab_size=16, block_size=32, n_layer=2, n_head=2, n_embd=16)
BATCH = 2


def host_random(seed):
    return np.random.default_rng(seed)


def on_device(*arrays):
    """Host arrays to the backend's (the same arrays under NumPy; device arrays under CuPy or devicesim)."""
    return [from_host(a) for a in arrays]


def averaged_over(communicator, array):
    """The mean over the group of a gradient, through the Communicator's buffer methods (device arrays too)."""
    out = xp.empty_like(array)
    communicator.allreduce(xp.ascontiguousarray(array), out=out)
    out /= communicator.size
    return out


def mean_over(communicator, value):
    """The mean over the group of a Python float (small metadata: pickled)."""
    return communicator.mpi.allreduce(value, op=MPI.SUM) / communicator.size


def _bytes_sent(communicator):
    return sum(record["bytes_sent"] for record in communicator.counters_snapshot().values())


def check_attention(communicator, compare, layout, variant, overlap):
    """One case of attention alone; returns this rank's causal work."""
    name = f"attention {layout} {variant}{' overlap' if overlap else ''}"
    rank, size = communicator.rank, communicator.size
    generator = host_random(7)
    q, k, v, weights = on_device(*(generator.standard_normal(ATTENTION_SHAPE) for _ in range(4)))
    whole = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    (ops.causal_attention(*whole) * Tensor(weights)).sum().backward()
    expected = ops.causal_attention(*(Tensor(a) for a in (q, k, v))).data

    positions = token_positions(rank, size, ATTENTION_SHAPE[2], layout)
    local = [Tensor(xp.ascontiguousarray(a[..., positions, :]), requires_grad=True) for a in (q, k, v)]
    work = AttentionWork()
    communicator.reset_counters()
    out = context_parallel_attention(*local, communicator, layout, variant, overlap, work)
    sent_forward = _bytes_sent(communicator)
    communicator.reset_counters()
    (out * Tensor(weights[..., positions, :])).sum().backward()
    sent_backward = _bytes_sent(communicator)

    compare.arrays_close(f"{name}: output", out.data, expected[..., positions, :], RTOL)
    for label, got, reference in zip("qkv", local, whole):
        compare.arrays_close(f"{name}: d{label}", got.grad, reference.grad[..., positions, :], RTOL, ATOL)
    batch, heads, length, width = ATTENTION_SHAPE
    block_bytes = batch * heads * (length // size) * width * 8  # one K (or V) block of T/N tokens, float64
    compare.value(f"{name}: bytes sent forward = 2(N-1) blocks", sent_forward, 2 * (size - 1) * block_bytes)
    backward_blocks = 4 * (size - 1) if variant == "ring" else 2 * (size - 1)
    compare.value(f"{name}: bytes sent backward = {backward_blocks // max(size - 1, 1)}(N-1) blocks",
                  sent_backward, backward_blocks * block_bytes)
    compare.checks.append(name)
    return work.causal_entries


def randomise_affine(model, seed):
    """Biases and LayerNorm gains away from 0 and 1, so a misplaced one would show."""
    generator = host_random(seed)
    for name, p in model.named_parameters():
        if name.endswith(".bias") or "norm" in name:
            p.data[...] = p.data + from_host(0.1 * generator.standard_normal(p.shape))


def check_model(communicator, compare, layout, variant, overlap):
    """Dropout on (0.1): every cp rank draws one process's mask at its positions, so still equal."""
    name = f"GPT {layout} {variant}{' overlap' if overlap else ''}"
    rank, size = communicator.rank, communicator.size
    config = GPTConfig(**MODEL, dropout=0.1)
    generator = host_random(11)
    ids, targets = on_device(*(generator.integers(0, config.vocab_size, (BATCH, config.block_size)) for _ in range(2)))
    reference = GPT(config, dtype="float64")
    randomise_affine(reference, 3)
    logits, loss = reference(ids, targets)
    loss.backward()

    model = GPT(config, dtype="float64")
    randomise_affine(model, 3)
    use_context_parallel(model, communicator, layout, variant, overlap)
    local_ids, local_targets = (split_tokens(a, rank, size, layout) for a in (ids, targets))
    local_logits, local_loss = model(local_ids, local_targets)
    local_loss.backward()
    reference.eval()
    model.eval()
    with single_process_modules(model):  # one process again, for generation: the whole sequence's logits
        compare.arrays_close(f"{name}: single-process modules", model(ids)[0].data, reference(ids)[0].data, RTOL)
    compare.value(f"{name}: parameter names", [n for n, _ in model.named_parameters()],
                  [n for n, _ in reference.named_parameters()])

    compare.arrays_close(f"{name}: loss (mean over cp)", np.array(mean_over(communicator, local_loss.item())),
                         np.array(loss.item()), RTOL)
    compare.arrays_close(f"{name}: gathered logits", gather_tokens(local_logits.data, communicator, layout),
                         logits.data, RTOL)
    reference_grads = dict(reference.named_parameters())
    for parameter_name, p in model.named_parameters():
        averaged = averaged_over(communicator, p.grad)
        compare.arrays_close(f"{name}: grad {parameter_name}", averaged, reference_grads[parameter_name].grad,
                             RTOL, ATOL)
    compare.checks.append(name)


CASES = [(layout, variant, overlap) for layout in ("contiguous", "zigzag")
         for variant, overlap in (("ring", False), ("ring", True), ("allgather", False))]


def run_checks(comm, cases=None, model=True):
    """Every case (a list of [layout, variant, overlap]; all of them by default), attention and GPT.

    Returns the comparisons and, per case, this rank's causal work.
    """
    communicator = Communicator(comm)
    compare = Comparisons()
    work = {}
    for layout, variant, overlap in cases or CASES:
        work[f"{layout} {variant} {overlap}"] = check_attention(communicator, compare, layout, variant, overlap)
        if model:
            check_model(communicator, compare, layout, variant, overlap)
    return {**compare.report(), "work": work}


def run_data_and_context_parallel(comm, dp, layout="zigzag", variant="ring", overlap=True):
    """dp x cp on the world, cp the faster-varying axis (the mesh's order: rank = d * cp + c).

    Replica d takes rows [d B/dp, (d+1) B/dp) of the batch, cp rank c its tokens of them; the
    gradients averaged over the whole dp x cp group equal one process's on the whole batch.
    """
    world = Communicator(comm)
    cp = world.size // dp
    replica, cp_rank = divmod(world.rank, cp)
    communicator = world.split(color=replica, key=cp_rank)
    compare = Comparisons()
    config = GPTConfig(**MODEL)  # dropout off: a replica draws masks for its rows only, one process for all
    generator = host_random(5)
    ids, targets = on_device(*(generator.integers(0, config.vocab_size, (2 * dp, config.block_size)) for _ in range(2)))
    reference = GPT(config, dtype="float64")
    randomise_affine(reference, 4)
    _, loss = reference(ids, targets)
    loss.backward()
    model = GPT(config, dtype="float64")
    randomise_affine(model, 4)
    use_context_parallel(model, communicator, layout, variant, overlap)
    rows = slice(replica * 2, (replica + 1) * 2)
    local_ids, local_targets = (split_tokens(a[rows], cp_rank, cp, layout) for a in (ids, targets))
    _, local_loss = model(local_ids, local_targets)
    local_loss.backward()
    name = f"dp {dp} x cp {cp} {layout} {variant}"
    compare.arrays_close(f"{name}: loss (mean over dp x cp)", np.array(mean_over(world, local_loss.item())),
                         np.array(loss.item()), RTOL)
    reference_grads = dict(reference.named_parameters())
    for parameter_name, p in model.named_parameters():
        averaged = averaged_over(world, p.grad)
        compare.arrays_close(f"{name}: grad {parameter_name}", averaged, reference_grads[parameter_name].grad,
                             RTOL, ATOL)
    compare.checks.append(name)
    return compare.report()


def run_with_tensor_parallel(comm, dp, cp, sequence_parallel, layout="zigzag", variant="ring"):
    """dp x cp x tp on the world in the mesh's order (rank = (d cp + c) tp + t), tensor parallelism's pieces.

    Each rank runs tensor_parallel_pieces with the embedding and attention swapped for cp; after
    backward, SP's partial gradients are summed over tp, then everything is averaged over the
    dp x cp ranks that share a tp rank. The tp shards, joined, equal one process's gradients.
    """
    from minipar.parallel.context_parallel_model import context_parallel_pieces, single_process_pieces
    from minipar.parallel.sequence_parallel import finish_tensor_parallel_gradients
    from minipar.parallel.tensor_parallel import tensor_parallel_pieces

    world = Communicator(comm)
    tp = world.size // (dp * cp)
    replica, rest = divmod(world.rank, cp * tp)
    cp_rank, tp_rank = divmod(rest, tp)
    tp_comm = world.split(color=world.rank // tp, key=tp_rank)
    cp_comm = world.split(color=replica * tp + tp_rank, key=cp_rank)
    averaging = world.split(color=tp_rank, key=world.rank)  # the dp x cp group
    compare = Comparisons()
    # Dropout on without dp (with dp a replica draws masks for its rows only, one process for all rows).
    config = GPTConfig(**{**MODEL, "n_head": 2 * tp, "vocab_size": 16 * tp, "dropout": 0.1 if dp == 1 else 0.0})
    generator = host_random(6)
    ids, targets = on_device(*(generator.integers(0, config.vocab_size, (2 * dp, config.block_size)) for _ in range(2)))
    reference = GPT(config, dtype="float64")
    randomise_affine(reference, 8)
    _, loss = reference(ids, targets)
    loss.backward()
    state = reference.state_dict()
    pieces = tensor_parallel_pieces(config, tp_comm, sequence_parallel, dtype="float64")
    parameters = list({id(p): p for piece in pieces for p in piece.parameters()}.values())
    for p in parameters:
        p.data[...] = p.shard.take(state[p.shard.full_name])
    pieces = context_parallel_pieces(pieces, cp_comm, layout, variant, overlap=False)
    rows = slice(replica * 2, (replica + 1) * 2)
    x = split_tokens(ids[rows], cp_rank, cp, layout)
    for piece in pieces[:-1]:
        x = piece(x)
    local_loss = pieces[-1](x, split_tokens(targets[rows], cp_rank, cp, layout))
    local_loss.backward()
    finish_tensor_parallel_gradients(parameters, tp_comm)
    name = f"dp {dp} x cp {cp} x tp {tp}{' SP' if sequence_parallel else ''} {layout} {variant}"
    compare.arrays_close(f"{name}: loss (mean over dp x cp)", np.array(mean_over(averaging, local_loss.item())),
                         np.array(loss.item()), RTOL)
    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    for p in parameters:
        averaged = averaged_over(averaging, p.grad)
        parts = xp.empty((tp, averaged.size), dtype=averaged.dtype)
        tp_comm.allgather(averaged.reshape(-1), parts.reshape(-1))
        joined = p.shard.join([part.reshape(averaged.shape) for part in parts])
        compare.arrays_close(f"{name}: grad {p.shard.full_name}", joined, reference_grads[p.shard.full_name],
                             RTOL, ATOL)
    reference.eval()
    with single_process_pieces(pieces) as one_process:  # tensor parallelism alone again, the whole rows
        x = ids[rows]
        for piece in one_process[:-1]:
            x = piece.eval()(x)
        sharded_loss = one_process[-1].eval()(x, targets[rows])
    compare.arrays_close(f"{name}: single-process pieces (eval)", np.array(sharded_loss.item()),
                         np.array(reference(ids[rows], targets[rows])[1].item()), RTOL)
    compare.checks.append(name)
    return compare.report()


def run_with_pipeline(comm, pp, dp, schedule="1f1b", microbatches=2, layout="zigzag", variant="ring"):
    """pp x dp x cp in the mesh's order (rank = (s dp + d) cp + c): each stage's pieces swapped for cp.

    Every cp rank of a stage runs the same schedule, so the ring's messages pair up; the tied
    embedding's two copies are summed over the pipeline's ends, then every gradient is averaged
    over the stage's dp x cp ranks, and equals one process's.
    """
    from minipar.parallel.context_parallel_model import context_parallel_pieces
    from minipar.parallel.pipeline.executor import PipelineExecutor, split_microbatches
    from minipar.parallel.pipeline.partition import TiedEmbeddingGradientSum, partition, stage_parameters

    world = Communicator(comm)
    cp = world.size // (pp * dp)
    stage, rest = divmod(world.rank, dp * cp)
    replica, cp_rank = divmod(rest, cp)
    pp_comm = world.split(color=rest, key=stage)
    cp_comm = world.split(color=stage * dp + replica, key=cp_rank)
    averaging = world.split(color=stage, key=world.rank)  # the stage's dp x cp ranks
    compare = Comparisons()
    config = GPTConfig(**MODEL)  # dropout off: a micro-batch draws masks for its rows only
    batch = 2 * microbatches
    generator = host_random(9)
    ids, targets = on_device(*(generator.integers(0, config.vocab_size, (batch * dp, config.block_size))
                               for _ in range(2)))
    reference = GPT(config, dtype="float64")
    randomise_affine(reference, 10)
    _, loss = reference(ids, targets)
    loss.backward()
    model = GPT(config, dtype="float64")
    randomise_affine(model, 10)
    pieces = context_parallel_pieces(model.pieces(), cp_comm, layout, variant)
    chunks = partition(pieces, pp, stage)
    named = stage_parameters(chunks)
    local_length = config.block_size // cp
    executor = PipelineExecutor(chunks, pp_comm, schedule, microbatches, (batch // microbatches, local_length,
                                                                          config.n_embd), xp.float64)
    tied = TiedEmbeddingGradientSum(named, pp_comm)
    rows = slice(replica * batch, (replica + 1) * batch)
    local_ids, local_targets = (split_tokens(a[rows], cp_rank, cp, layout) for a in (ids, targets))
    local_loss = executor.run(split_microbatches(local_ids, microbatches), split_microbatches(local_targets,
                                                                                                microbatches))
    tied.finish_gradient_sync()
    name = f"pp {pp} x dp {dp} x cp {cp} {schedule} {layout} {variant}"
    if stage == pp - 1:
        compare.arrays_close(f"{name}: loss (mean over dp x cp)", np.array(mean_over(averaging, local_loss.item())),
                             np.array(loss.item()), RTOL)
    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    for parameter_name, p in named:
        averaged = averaged_over(averaging, p.grad)
        compare.arrays_close(f"{name}: stage {stage} grad {parameter_name}", averaged,
                             reference_grads[parameter_name], RTOL, ATOL)
    compare.checks.append(name)
    return compare.report()
