"""What a layout puts on each rank: the parameters it holds, its optimizer state, its activations.

Symbols (as in /docs/planning.md): $L$ layers, $h$ = n_embd, $a$ heads, $s$ sequence length,
$V$ vocabulary, $b$ micro-batch rows, $t$ tensor-parallel ranks, $p$ pipeline stages, $v$ chunks per
stage, $m$ micro-batches, $N_d$ data-parallel ranks, $Ψ$ parameters on a rank, $e$ bytes per element.

Parameters, gradients, optimizer state. minipar trains in one float type, so with AdamW a rank holds
$eΨ$ of parameters, $eΨ$ of gradients and $2eΨ$ of moments: $16Ψ$ bytes in fp32, the same total as
the mixed-precision $(2 + 2 + K)Ψ$ of Rajbhandari et al. 2020 (ZeRO, section 3.1: fp16 parameters
and gradients, $K = 12$ bytes of fp32 master copy, momentum and variance). ZeRO over $N_d$ ranks
shards:

| stage | paper, mixed precision   | minipar, fp32 AdamW ($e = 4$)                                |
|-------|--------------------------|--------------------------------------------------------------|
| 0     | $(2 + 2 + K)Ψ$           | $4Ψ + 4Ψ + 8Ψ$                                               |
| 1     | $2Ψ + 2Ψ + KΨ/N_d$       | $4Ψ + 4Ψ + 8Ψ/N_d$ (+ the full gradient during the step)     |
| 2     | $2Ψ + (2 + K)Ψ/N_d$      | $4Ψ + (4 + 8)Ψ/N_d$                                          |
| 3     | $(2 + 2 + K)Ψ/N_d$       | $(4 + 4 + 8)Ψ/N_d$                                           |

To the byte, minipar cuts every parameter (each a tensor-parallel shard) into $N_d$ parts of
$⌈n/N_d⌉$ elements, zero-padded (parallel/zero.py), and keeps the whole padded parameter in
stages 1-2; ``parameter_memory`` does that arithmetic on the list ``rank_parameters`` (strategy.py)
gives, the same list in the same order as the Trainer's ``stage_parameters``.

Activations per micro-batch, per layer (``layer_activation_bytes``). Korthikanti et al. 2022
(Table 2) count, for 16-bit activations and 1-byte dropout masks, $sbh(34 + 5as/h)$ bytes, and
$sbh(10 + 24/t + 5as/(ht))$ with tensor parallelism, $sbh(34/t + 5as/(ht))$ with sequence
parallelism too, $2sbh$ with full recomputation (only the layer's input kept). minipar's engine
keeps fewer arrays (no dropout masks at $p = 0$, GELU keeps its input and $tanh(u)$, softmax keeps
only $P$) in $e$ bytes each; its own count, op by op, in elements:

| op            | what it keeps                        | elements          | under SP                          |
|---------------|--------------------------------------|-------------------|-----------------------------------|
| LayerNorm ×2  | $x̂$ ($bsh$) and $1/σ$ ($bs$) each    | $2bsh + 2bs$      | divided by $t$                    |
| QKV linear    | its input ($bsh$)                    | $bsh$             | the same: the gathered input      |
| attention     | $Q, K, V$ ($3bsh/t$), $P$ ($abs²/t$) | $3bsh/t + abs²/t$ |                                   |
| output linear | its input ($bsh/t$)                  | $bsh/t$           |                                   |
| MLP hidden    | its input ($bsh$)                    | $bsh$             | the same                          |
| GELU          | $x$ and $tanh(u)$ ($4bsh/t$ each)    | $8bsh/t$          |                                   |
| MLP output    | its input ($4bsh/t$)                 | $4bsh/t$          |                                   |

In total $e·[bsh(4 + 16/t) + 2bs + abs²/t]$, or $e·[bsh(2 + 18/t) + 2bs/t + abs²/t]$ under SP.

The first and last pieces add the token ids and the logits' softmax (``piece_activation_bytes``).

In flight (``in_flight``): GPipe keeps all $m$ micro-batches, 1F1B $min(p − stage, m)$ (Narayanan
et al. 2021), interleaved 1F1B $(v−1)p + 2(p − stage − 1) + 1$, at most $m·v$;
``activation_memory`` multiplies them by the chunk's bytes. ``memory_per_rank`` adds the terms
up, with the communication buffers (``buffer_memory``); under ``precision="mixed"`` it uses the
papers' accounting instead (``mixed_precision_memory``: ZeRO's $(2 + 2 + 12)Ψ$ and Korthikanti's
activations).
"""
import functools
from dataclasses import dataclass

from minipar.plan.model import part_length
from minipar.plan.strategy import rank_chunks, rank_parameters, rank_pieces, zero_named_units, zero_units

# ---- parameters, gradients, optimizer state ------------------------------------------------------

def zero_gradient_elements(model, strategy, stage):
    """Elements of gradient a ZeRO rank holds after the step: each unit's averaged parts (the
    sequence-parallel and tied-embedding sums write into them in place, parallel/placement.py)."""
    return sum(part_length(n, strategy.dp) for _, unit in zero_named_units(model, strategy, stage) for _, n in unit)


def parameter_memory(model, strategy, stage):
    """Bytes of parameters, gradients and AdamW moments on ``stage``, as ``Trainer.memory_report``."""
    e, sizes = strategy.dtype_bytes, [n for _, _, n in rank_parameters(model, strategy, stage)]
    zero, count = strategy.effective_zero, strategy.dp
    if zero == 0:
        psi = sum(sizes)
        return {"parameters": e * psi, "gradients": e * psi, "optimizer_states": 2 * e * psi}
    parts = sum(part_length(n, count) for _, unit in zero_units(model, strategy, stage) for n in unit)
    held = count * parts if zero < 3 else parts  # stages 1-2 keep every padded parameter whole
    gradients = zero_gradient_elements(model, strategy, stage)
    return {"parameters": e * held, "gradients": e * gradients, "optimizer_states": 2 * e * parts}


def paper_parameter_memory(psi, zero, dp, state_bytes=16):
    """Rajbhandari et al. 2020, mixed-precision Adam: bytes of (fp16 params, fp16 grads, $K = 12$
    bytes of fp32 master weights, momentum and variance); ``state_bytes=18``: Megatron-LM's fp32
    main gradients (2 + 4 + 12)."""
    shard = {0: (1, 1, 1), 1: (1, 1, dp), 2: (1, dp, dp), 3: (dp, dp, dp)}[zero]
    gradient = state_bytes - 14
    return {"parameters": 2 * psi / shard[0], "gradients": gradient * psi / shard[1],
            "optimizer_states": 12 * psi / shard[2]}


# ---- activations ---------------------------------------------------------------------------------

def layer_activation_bytes(model, b, tp, sequence_parallel, e=4):
    """Bytes one block keeps for backward per micro-batch of b rows (module docstring, engine count)."""
    s, h, a = model.block_size, model.n_embd, model.n_head
    if sequence_parallel:
        return e * (b * s * h * (2 * tp + 18) // tp + 2 * b * s // tp + a * b * s * s // tp)
    return e * (b * s * h * (4 * tp + 16) // tp + 2 * b * s + a * b * s * s // tp)


def korthikanti_layer_bytes(model, b, tp=1, sequence_parallel=False, recompute=None, cp=1):
    """Korthikanti et al. 2022, Table 2 (16-bit activations): bytes per layer per micro-batch.

    Their $sbh(34 + 5as/h)$ is, per token: attention $11h$ (QKV input, $Q$, $K$, $V$, the output
    projection's input, a dropout mask) $+ 5as$ (scores, softmax, its mask and output: the $s²$
    terms); MLP $19h$ (input, GELU input and output, mask); two norms $4h$. Outside the
    tensor-parallel region $10h$ (norms, the two inputs, the two masks): divided by $t$ only under
    sequence parallelism. Generalised here, term by term, to $K$ and $V$ of width $g·d$ (GQA), a
    SwiGLU MLP (input, gate and up outputs, their product: $2h + 6f + h$), top_k copies of each
    token in an expert MLP, and a sequence of $s/cp$ tokens per rank."""
    s, h, a, f = model.block_size / cp, model.n_embd, model.n_head, model.hidden
    k, kv = model.top_k, model.kv_width
    if recompute == "full":
        return 2 * s * b * h / (tp if sequence_parallel else 1)
    outside = 10 * h  # norms 4h, the QKV and MLP inputs 2h each, two dropout masks
    inside = 2 * h + 4 * kv + 2 * h  # Q, K, V, the output projection's input
    inside += k * (4 * f if model.ffn == "gelu" else 6 * f) + (k - 1) * 3 * h  # the MLP, top_k copies
    attention = 0.0 if recompute == "selective" else 5 * a * model.block_size  # reruns the s² part
    if sequence_parallel:
        return s * b * (outside + inside + attention) / tp
    return s * b * (outside + inside / tp + attention / tp)


def piece_activation_bytes(model, piece, b, strategy):
    """Bytes a piece keeps for backward per micro-batch (the engine's count).

    Integer index arrays (token ids, targets, the vocab-parallel local ids: 8·b·s bytes each, at
    most three per micro-batch) are left out here and by the measurement: the ids are the input
    batch itself, held by the step whether or not backward needs them.
    """
    e, t, sp = strategy.dtype_bytes, strategy.tp, strategy.sequence_parallel
    s, h = model.block_size, model.n_embd
    split_model = t > 1 or sp  # minipar builds the tensor-parallel pieces then, even at t = 1
    if piece == "block":
        return layer_activation_bytes(model, b, t, sp, e)
    if piece == "embedding":  # tp: the looked-up rows and the mask of ids in this rank's range
        return e * (b * s * h + b * s) if split_model else 0
    # head: LayerNorm (x̂, 1/σ), the logits' input (full), the softmax over V/t
    norm = e * (b * s * h + b * s) // (t if sp else 1)
    # Both losses end in the 0-d loss itself, which the executor's 1/m scaling keeps for backward.
    if split_model:  # + whether each target is in this rank's range (bool)
        return norm + e * b * s * h + e * b * s * model.vocab_size // t + b * s + e
    return norm + e * b * s * h + e * b * s * model.vocab_size + e


@functools.lru_cache(maxsize=4096)
def chunk_activation_bytes(model, strategy, chunk):
    b = strategy.micro_batch
    pieces = [piece for c, piece in rank_pieces(model, strategy, chunk % strategy.pp) if c == chunk]
    return sum(piece_activation_bytes(model, piece, b, strategy) for piece in pieces)


def in_flight(strategy, stage):
    """Most (micro-batch, chunk) pairs whose forward has run and backward not, on ``stage``.

    GPipe: all $m$. 1F1B: $min(p − stage, m)$ (Narayanan et al. 2021). Interleaved: the warm-up
    forwards $(v−1)p + 2(p − stage − 1)$, one more in steady state, at most $m·v$. ZB-H1: $min(p, m)$
    and ZB-H2: $min(2p − 1, m)$ on every stage, counted until W; ZB-V: $2p$ chunk-sized pairs, 1F1B's
    memory (Qi et al. 2023; the simulator's ``peak_in_flight``).
    """
    p, m, v, s = strategy.pp, strategy.microbatches, strategy.virtual_stages, stage
    if strategy.schedule == "gpipe":
        return m * v
    # Zero-bubble: a micro-batch's activations live until its W (the weights' products need their
    # inputs), and stage s puts W off by s (ZB-H1) or 2s (ZB-H2) slots: p and 2p - 1 on every stage.
    if strategy.schedule == "zb-h1":
        return min(p, m)
    if strategy.schedule == "zb-h2":
        return min(2 * p - 1, m)
    if strategy.schedule == "zbv":  # two chunks per rank, 1F1B's memory: p micro-batches of L/p layers
        return min(2 * p, 2 * m)
    if strategy.schedule == "1f1b" or v == 1:
        return min(p - s, m)
    return min((v - 1) * p + 2 * (p - s - 1) + 1, m * v)


def activation_memory(model, strategy, stage):
    """Peak bytes kept for backward on ``stage`` during a step.

    Without recomputation: the in-flight micro-batches, each with its chunk's bytes (for several
    chunks per rank, the larger chunk counted for each, an upper bound that is exact when chunks
    are equal). With recomputation (or ZeRO-3, which reruns each piece's forward in its backward):
    only one chunk's (piece's) graph lives at a time; the stashed inputs are counted apart.
    """
    b, chunks = strategy.micro_batch, rank_chunks(strategy, stage)
    if strategy.effective_zero == 3:
        return max(piece_activation_bytes(model, piece, b, strategy)
                   for _, piece in rank_pieces(model, strategy, stage))
    largest = max(chunk_activation_bytes(model, strategy, c) for c in chunks)
    if strategy.recompute:
        return largest
    if len(chunks) == 1:
        return in_flight(strategy, stage) * largest
    return in_flight_peak_from_schedule(model, strategy, stage)


def in_flight_peak_from_schedule(model, strategy, stage):
    """Walk this stage's schedule (schedules are data) adding and freeing each chunk's bytes."""
    from minipar.parallel.pipeline.schedules import BACKWARD, BACKWARD_WEIGHT, FORWARD, build_schedule

    actions = build_schedule(strategy.schedule, strategy.pp, strategy.microbatches, stage, strategy.virtual_stages)
    sizes = {c: chunk_activation_bytes(model, strategy, c) for c in rank_chunks(strategy, stage)}
    live = peak = 0
    for action in actions:
        if action.kind == FORWARD:
            live += sizes[action.chunk]
            peak = max(peak, live)
        elif action.kind in (BACKWARD, BACKWARD_WEIGHT):  # a split backward frees at W, not at B
            live -= sizes[action.chunk]
    return peak


def stashed_input_bytes(model, strategy, stage):
    """Recomputation keeps each in-flight chunk's input (b, s/t under SP, h), outside the graph."""
    if not strategy.recompute or strategy.effective_zero == 3:
        return 0
    s = model.block_size // (strategy.tp if strategy.sequence_parallel else 1)
    per = strategy.dtype_bytes * strategy.micro_batch * s * model.n_embd
    return in_flight(strategy, stage) * per


@dataclass(frozen=True)
class Headroom:
    """Memory a rank needs beyond its tensors (flags: --framework-gb, --buffers-gb, --fragmentation).

    framework: the runtime's own share (on a GPU the CUDA context, cuBLAS workspaces and NCCL,
    typically 1-2 GB; for a CPU rank the Python interpreter, NumPy and MPI); buffers: the
    collectives' staging buffers beyond those the planner counts by name; fragmentation: the
    share of the tensors' bytes an allocator loses to fragments (PyTorch's caching allocator
    commonly loses 5-10%). ZeRO-3's gathered layer (one piece's full parameters, twice with
    prefetching) is counted by the layout, not here."""

    framework: float = 0.0
    buffers: float = 0.0
    fragmentation: float = 0.0

    @classmethod
    def for_machine(cls, machine):
        if getattr(machine, "device", "cpu") == "gpu":
            return cls(framework=2e9, buffers=0.5e9, fragmentation=0.05)
        return cls(framework=0.15e9, buffers=0.0, fragmentation=0.0)


def peak_full_gradient_bytes(model, strategy, stage):
    """Bytes of whole (unsharded) gradients a ZeRO rank holds at once during the step.

    Stage 1 reduce-scatters after the last micro-batch's backward, so every gradient is held
    whole at once: $eΨ$. Stages 2-3 (parallel/zero.py) reduce-scatter each unit after every
    micro-batch's backward of it (DeepSpeed's way), so at any $m$ the planner counts the largest
    unit and the tied embedding (held until both its uses are done): an upper bound, not the
    byte-exact figure it gives for stage 1.
    """
    e, zero = strategy.dtype_bytes, strategy.effective_zero
    sizes = [n for _, _, n in rank_parameters(model, strategy, stage)]
    if zero == 0 or zero == 1:
        return e * sum(sizes)
    units = zero_units(model, strategy, stage)
    tied = max((sum(unit) for users, unit in units if len(users) > 1), default=0)
    return e * (max(sum(unit) for users, unit in units if len(users) == 1) + tied)


def state_bytes(model, strategy, stage):
    """Bytes of parameters, gradients and optimizer state held on ``stage`` after the step."""
    if strategy.precision == "fp32":
        return sum(parameter_memory(model, strategy, stage).values())
    psi = sum(n for _, _, n in rank_parameters(model, strategy, stage))
    return sum(paper_parameter_memory(psi, strategy.effective_zero, strategy.dp, strategy.state_bytes).values())


def memory_per_rank(model, strategy, stage, headroom=None):
    """Every term for the rank of ``stage``, bytes: its peak during a step (gradients at their
    peak, ``peak_full_gradient_bytes``), plus the headroom's terms."""
    if strategy.precision == "fp32":
        memory = parameter_memory(model, strategy, stage)
        parts = memory["gradients"]
        memory["gradients"] = max(parts, peak_full_gradient_bytes(model, strategy, stage))
        memory["activations"] = activation_memory(model, strategy, stage) + stashed_input_bytes(model, strategy, stage)
        memory["buffers"] = buffer_memory(model, strategy, stage)
    else:
        memory = mixed_precision_memory(model, strategy, stage)
    headroom = headroom or Headroom()
    tensors = sum(memory.values())
    memory["framework"] = headroom.framework
    memory["buffers"] += headroom.buffers
    memory["fragmentation"] = headroom.fragmentation * tensors
    memory["total"] = sum(memory.values())
    return memory


def mixed_precision_memory(model, strategy, stage):
    """The papers' GPU accounting: ZeRO's $(2 + 2 + 12)Ψ$ (or $18Ψ$: Megatron's fp32 gradients) and
    Korthikanti's activations.

    In flight on the first 1F1B stage: $L/p$ layers for each of $min(p, m)$ micro-batches, about $L$
    layers of one micro-batch (Korthikanti et al. 2022, section 4.2.3), times $1 + (p−1)/(pv)$ when
    interleaved; full recomputation keeps $2sbh$ per layer in flight plus one layer's whole set while
    it is recomputed. The head's fp32 softmax over $V/t$ adds $4sbV/t$ bytes. Gradients at their peak
    (16-bit, or fp32 with 18 bytes): whole while minipar accumulates micro-batches under ZeRO
    (``peak_full_gradient_bytes``). ZeRO-3 gathers a piece's full parameters, and prefetches the next.
    """
    s = strategy
    psi = sum(n for _, _, n in rank_parameters(model, s, stage))
    memory = paper_parameter_memory(psi, s.effective_zero, s.dp, s.state_bytes)
    grad_e = 4 if s.state_bytes == 18 else 2
    if s.effective_zero:
        memory["gradients"] = max(memory["gradients"],
                                  peak_full_gradient_bytes(model, s, stage) / s.dtype_bytes * grad_e)
    layers = sum(piece == "block" for _, piece in rank_pieces(model, s, stage))
    b, cp = s.micro_batch, s.cp
    full = korthikanti_layer_bytes(model, b, s.tp, s.sequence_parallel, cp=cp)
    per_layer = korthikanti_layer_bytes(model, b, s.tp, s.sequence_parallel, s.recompute or None, cp=cp)
    if s.schedule in ("gpipe", "zb-h1", "zb-h2", "zbv"):
        flight = in_flight(s, stage) / s.virtual_stages
    else:
        flight = in_flight(s.with_(schedule="1f1b", virtual_stages=1), stage)
        if s.virtual_stages > 1:
            flight *= 1 + (s.pp - 1) / (s.pp * s.virtual_stages)
    memory["activations"] = flight * layers * per_layer + (full if s.recompute == "full" else 0)
    if stage == s.pp - 1:
        memory["activations"] += 4 * model.block_size // cp * b * model.vocab_size / s.tp
    x = b * model.block_size // cp * model.n_embd // (s.tp if s.sequence_parallel else 1)
    memory["buffers"] = 4 * 2 * x if s.pp > 1 else 0.0  # two receives and two sends in flight
    if s.effective_zero == 3:  # the gathered piece and the prefetched next one, 16-bit
        memory["buffers"] += 2 * 2 * max(sum(unit) for _, unit in zero_units(model, s, stage))
    return memory


def buffer_memory(model, strategy, stage):
    """Communication buffers: dp gradient buckets (plain dp), a ZeRO unit's rows, pipeline messages."""
    e, names = strategy.dtype_bytes, rank_parameters(model, strategy, stage)
    if strategy.dp > 1 and strategy.effective_zero == 0:
        dp = e * sum(n for _, _, n in names)  # the buckets hold every gradient once
    elif strategy.effective_zero:
        dp = e * max(strategy.dp * sum(part_length(n, strategy.dp) for n in unit)
                     for _, unit in zero_units(model, strategy, stage))
    else:
        dp = 0
    s = model.block_size // (strategy.tp if strategy.sequence_parallel else 1)
    pp = 4 * e * strategy.micro_batch * s * model.n_embd if strategy.pp > 1 else 0  # 2 receive + 2 send
    return dp + pp


def fits(memory, capacity_bytes):
    return memory["total"] <= capacity_bytes
