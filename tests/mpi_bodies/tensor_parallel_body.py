"""Checks for minipar.parallel.tensor_parallel, run on every rank by tests/test_tensor_parallel.py.

One launch per world size; the tensor-parallel group is the whole world (tp = N), plus,
on 4 ranks, the two tp groups of a dp 2 x tp 2 grid. Everything runs in float64 and is
compared with the single-process GPT on the same batch: the sharded model is the same
computation with the sums split across ranks, so only rounding differs (rtol 1e-10).

Biases and LayerNorm gains start at random values, not GPT-2's 0 and 1, in both models: a
bias added on every rank before a sum, or a gain left out, would be invisible otherwise.
Every comparison is recorded (tests/mpi_bodies/comparisons.py) and returned to pytest.
"""
import numpy as np

from minipar import ops
from minipar.backend import set_default_dtype, xp
from minipar.comm import Communicator
from minipar.errors import ConfigError, ShapeError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.optim import AdamW
from minipar.parallel.placement import Partial, placement_of
from minipar.parallel.sequence_parallel import finish_tensor_parallel_gradients
from minipar.parallel.tensor_parallel import tensor_parallel_pieces
from minipar.parallel.tensor_parallel_comm import VocabParallelCrossEntropy
from minipar.parallel.topology import Layout, ProcessGrid
from minipar.tensor import Tensor
from tests.mpi_bodies.comparisons import Comparisons

MODEL = dict(vocab_size=16, block_size=8, n_layer=2, n_head=8, n_embd=32)
BATCH = 2
RTOL = 1e-10
ADAMW = dict(lr=1e-2, weight_decay=0.1)
STEPS = 3


def batch(config, seed):
    generator = np.random.default_rng(seed)
    shape = (BATCH, config.block_size)
    return generator.integers(0, config.vocab_size, shape), generator.integers(0, config.vocab_size, shape)


def unique_parameters(pieces):
    seen, out = set(), []
    for piece in pieces:
        for p in piece.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def joined(parameter, array, communicator, compare):
    """The full single-process array from every tp rank's shard (raw MPI: no counters touched)."""
    local = xp.ascontiguousarray(array).reshape(-1)
    parts = xp.empty((communicator.size, local.size), dtype=local.dtype)
    communicator.mpi.Allgather(local, parts)
    parts = [part.reshape(array.shape) for part in parts]
    if parameter.shard.is_replicated:
        for rank, part in enumerate(parts):  # replicated parameters must agree across the group
            compare.arrays_close(f"{parameter.shard.full_name}: tp rank {rank} against rank 0", part, parts[0], RTOL)
    return parameter.shard.join(parts)


def close(compare, what, actual, expected):
    scale = float(np.abs(expected).max()) if np.size(expected) else 0.0
    compare.arrays_close(what, actual, expected, rtol=RTOL, atol=1e-12 * scale)


def start_away_from_zero_and_one(reference, parameters, seed=21):
    """Draw every bias and LayerNorm gain (GPT-2 starts them at 0 and 1) at random, in both models."""
    state = reference.state_dict()
    generator = np.random.default_rng(seed)
    for name in sorted(state):
        if name.endswith("bias") or "norm" in name:
            state[name] = generator.normal(0.5, 0.3, state[name].shape)
    reference.load_state_dict(state)
    for p in parameters:
        p.data[...] = p.shard.take(state[p.shard.full_name])


def run_pieces(pieces, ids, targets, communicator):
    """Forward and backward piece by piece, cutting the graph between pieces as a pipeline
    stage does; returns the loss, each piece's forward and backward counters and the shapes
    passed between pieces."""
    forward, backward, boundary_inputs, outputs = [], [], [], []
    x = ids
    for piece in pieces[:-1]:
        communicator.reset_counters()
        out = piece(x)
        forward.append(communicator.counters_snapshot())
        boundary_inputs.append(x)
        outputs.append(out)
        x = Tensor(out.data, requires_grad=True)
    communicator.reset_counters()
    loss = pieces[-1](x, targets)
    forward.append(communicator.counters_snapshot())
    communicator.reset_counters()
    loss.backward()
    backward.append(communicator.counters_snapshot())
    grad = x.grad
    for out, x in zip(reversed(outputs), reversed(boundary_inputs), strict=True):
        communicator.reset_counters()
        out.backward(grad)
        backward.insert(0, communicator.counters_snapshot())
        grad = x.grad if isinstance(x, Tensor) else None
    return loss, forward, backward, [out.shape for out in outputs]


def expected_traffic(config, sequence_parallel, tp):
    """Per piece: {collective: (calls, elements)} forward and backward.

    Megatron: each block does g twice in forward (after attention and after the MLP) and
    f twice in backward (before QKV and before the MLP), each an allreduce of b*s*h. The
    embedding's g adds one forward allreduce of b*s*h; the head's f one backward
    allreduce of b*s*h, and its loss three forward allreduces of b*s (row max, sum of
    exps, target logit). Sequence parallel: every allreduce of b*s*h becomes one
    all-gather plus one reduce-scatter split between forward and backward.
    """
    bsh, bs = BATCH * config.block_size * config.n_embd, BATCH * config.block_size
    if not sequence_parallel:
        embedding = ({"allreduce": (1, bsh)}, {})
        block = ({"allreduce": (2, 2 * bsh)}, {"allreduce": (2, 2 * bsh)})
        head = ({"allreduce": (3, 3 * bs)}, {"allreduce": (1, bsh)})
    else:
        embedding = ({"reduce_scatter": (1, bsh)}, {"allgather": (1, bsh)})
        both = {"allgather": (2, 2 * bsh), "reduce_scatter": (2, 2 * bsh)}
        block = (both, both)
        head = ({"allgather": (1, bsh), "allreduce": (3, 3 * bs)}, {"reduce_scatter": (1, bsh)})
    return [embedding, *[block] * config.n_layer, head]


def check_traffic(compare, counters, expected, tp, what):
    """Calls and elements exactly; bytes from the ring model: allreduce 2(t-1)/t n, the others (t-1)/t n."""
    got = {name: (record["calls"], record["elements"]) for name, record in counters.items()}
    compare.value(f"{what}: traffic (calls, elements)", got, expected)
    for name, (_, elements) in expected.items():
        factor = 2 if name == "allreduce" else 1
        sent = counters.get(name, {}).get("bytes_sent")
        compare.value(f"{what}: {name} bytes sent", sent, factor * (tp - 1) * elements * 8 // tp)


def block_bytes(traffic):
    return sum(record["bytes_sent"] for record in traffic.values())


def check_equivalence(compare, tp_comm, sequence_parallel, with_training=True):
    config = GPTConfig(**MODEL)
    tp, label = tp_comm.size, f"tp={tp_comm.size} sp={sequence_parallel}"
    reference = GPT(config)
    pieces = tensor_parallel_pieces(config, tp_comm, sequence_parallel)
    parameters = unique_parameters(pieces)
    full_state = reference.state_dict()
    compare.value(f"{label}: full names of the pieces' parameters", sorted(p.shard.full_name for p in parameters),
                  sorted(full_state))
    for p in parameters:  # built as exact slices of the single-process initial weights
        name = p.shard.full_name
        compare.arrays_equal(f"{label}: initial {name}", p.data, p.shard.take(full_state[name]))
    sequence_sharded = sorted(p.shard.full_name for p in parameters if isinstance(placement_of(p, "tp"), Partial))
    # Under SP: every LayerNorm, the position embedding and the row-parallel (output) biases.
    expected_sharded = sorted(n for n in full_state
                              if "norm" in n or n == "embedding.position.weight" or n.endswith("output.bias"))
    compare.value(f"{label}: replicated parameters with partial gradients", sequence_sharded,
                  expected_sharded if sequence_parallel else [])
    start_away_from_zero_and_one(reference, parameters)

    ids, targets = batch(config, seed=5)
    loss, forward, backward, shapes = run_pieces(pieces, ids, targets, tp_comm)
    local_length = config.block_size // (tp if sequence_parallel else 1)
    compare.value(f"{label}: activation shapes between pieces", shapes,
                  [(BATCH, local_length, config.n_embd)] * (config.n_layer + 1))
    expected = expected_traffic(config, sequence_parallel, tp)
    for index, (fwd, bwd) in enumerate(expected):
        check_traffic(compare, forward[index], fwd, tp, f"{label} piece {index} forward")
        check_traffic(compare, backward[index], bwd, tp, f"{label} piece {index} backward")
    # Narayanan et al. 2021: a layer moves 8 b s h (t-1)/t elements per micro-batch, forward plus backward.
    compare.value(f"{label}: bytes one layer sends, forward plus backward",
                  block_bytes(forward[1]) + block_bytes(backward[1]),
                  8 * BATCH * config.block_size * config.n_embd * (tp - 1) // tp * 8)

    tp_comm.reset_counters()
    finish_tensor_parallel_gradients(parameters, tp_comm)
    finishing = {name: (r["calls"], r["elements"]) for name, r in tp_comm.counters_snapshot().items()}
    summed = sum(p.size for p in parameters if isinstance(placement_of(p, "tp"), Partial))
    compare.value(f"{label}: traffic of finish_tensor_parallel_gradients", finishing,
                  {"allreduce": (1, summed)} if sequence_parallel else {})

    _, reference_loss = reference(ids, targets)
    reference_loss.backward()
    close(compare, f"{label}: loss", loss.item(), reference_loss.item())
    reference_grads = {name: p.grad for name, p in reference.named_parameters()}
    for p in parameters:
        compare.true(f"{label}: {p.shard.full_name} has a gradient", p.grad is not None)
        if p.grad is not None:
            close(compare, f"{label}: grad of {p.shard.full_name}", joined(p, p.grad, tp_comm, compare),
                  reference_grads[p.shard.full_name])
    x = ids
    for piece in pieces[:-1]:
        x = piece(x)
    close(compare, f"{label}: gathered logits", pieces[-1].logits(x).data, reference(ids)[0].data)
    if with_training:
        check_training(compare, config, reference, pieces, parameters, tp_comm, label)
    return forward, backward


def check_training(compare, config, reference, pieces, parameters, tp_comm, label):
    """k AdamW steps, each rank updating only its shards, track single-process training."""
    reference_optimizer, optimizer = AdamW(reference.parameters(), **ADAMW), AdamW(parameters, **ADAMW)
    initial = reference.state_dict()
    for step in range(STEPS):
        ids, targets = batch(config, seed=100 + step)
        reference.zero_grad()
        _, reference_loss = reference(ids, targets)
        reference_loss.backward()
        reference_optimizer.step()
        for p in parameters:
            p.grad = None
        x = ids
        for piece in pieces[:-1]:
            x = piece(x)
        loss = pieces[-1](x, targets)
        loss.backward()
        finish_tensor_parallel_gradients(parameters, tp_comm)
        optimizer.step()
        close(compare, f"{label}: loss at step {step}", loss.item(), reference_loss.item())
    # Compare what training changed, to 1e-10 of the largest change in each tensor. (Adam divides
    # by sqrt(v) + eps, so a gradient that is zero in exact arithmetic, like the key bias's, under
    # which softmax is shift invariant, turns rounding noise into moves of ~1e-14 in either run.)
    final = reference.state_dict()
    for p in parameters:
        name = p.shard.full_name
        expected_change = final[name] - initial[name]
        compare.arrays_close(f"{label}: change of {name} over {STEPS} AdamW steps",
                             joined(p, p.data, tp_comm, compare) - initial[name], expected_change, rtol=RTOL,
                             atol=RTOL * float(np.abs(expected_change).max()))


def check_dropout(compare, tp_comm, sequence_parallel):
    """With dropout the sharded model draws the single-process masks, so it still matches."""
    config = GPTConfig(**MODEL, dropout=0.2)
    label = f"dropout tp={tp_comm.size} sp={sequence_parallel}"
    reference, pieces = GPT(config), tensor_parallel_pieces(config, tp_comm, sequence_parallel)
    start_away_from_zero_and_one(reference, unique_parameters(pieces), seed=22)
    ids, targets = batch(config, seed=9)
    _, reference_loss = reference(ids, targets)
    reference_loss.backward()
    x = ids
    for piece in pieces[:-1]:
        x = piece(x)
    loss = pieces[-1](x, targets)
    loss.backward()
    parameters = unique_parameters(pieces)
    finish_tensor_parallel_gradients(parameters, tp_comm)
    close(compare, f"{label}: loss", loss.item(), reference_loss.item())
    reference_grads = {name: p.grad for name, p in reference.named_parameters()}
    for p in parameters:
        close(compare, f"{label}: grad of {p.shard.full_name}", joined(p, p.grad, tp_comm, compare),
              reference_grads[p.shard.full_name])


PADDING = -100


def check_loss_with_padding(compare, tp_comm):
    """The vocab-parallel loss leaves ``ignore_index`` targets out as ``ops.cross_entropy`` does:
    the same mean over the counted rows, and zero gradient on the padded ones."""
    generator = np.random.default_rng(5)
    vocab, local = MODEL["vocab_size"], MODEL["vocab_size"] // tp_comm.size
    start = tp_comm.rank * local
    logits = generator.normal(0.0, 3.0, (BATCH, 6, vocab))
    targets = generator.integers(0, vocab, (BATCH, 6))
    targets[0, :4] = PADDING
    for what, rows in (("some targets padded", targets), ("every target padded", np.full_like(targets, PADDING))):
        whole = Tensor(logits, requires_grad=True)
        expected = ops.cross_entropy(whole, rows, ignore_index=PADDING)
        expected.backward()
        shard = Tensor(np.ascontiguousarray(logits[..., start:start + local]), requires_grad=True)
        loss = VocabParallelCrossEntropy.apply(shard, rows, communicator=tp_comm, vocab_start=start,
                                               ignore_index=PADDING)
        loss.backward()
        close(compare, f"vocab-parallel loss, {what}", loss.data, expected.data)
        close(compare, f"vocab-parallel loss, {what}: dL/dlogits of this rank's shard", shard.grad,
              whole.grad[..., start:start + local])
        compare.value(f"vocab-parallel loss, {what}: padded rows' gradient is zero",
                      bool((shard.grad[rows == PADDING] == 0).all()), True)


def raised(communicator, call):
    """(error type, message) that ``call()`` raised, and whether every rank got the same message."""
    try:
        call()
    except (ConfigError, ShapeError) as error:
        kind, message = type(error).__name__, str(error)
    else:
        kind, message = "nothing raised", ""
    messages = communicator.mpi.allgather(message)  # small metadata: pickle is fine
    return kind, message, len(set(messages)) == 1


def check_bad_input(compare, tp_comm):
    tp = tp_comm.size
    if tp == 1:
        return
    bad = GPTConfig(vocab_size=15, block_size=8, n_layer=1, n_head=3, n_embd=12)
    embedding = tensor_parallel_pieces(GPTConfig(**MODEL), tp_comm, sequence_parallel=True)[0]
    odd_length = np.zeros((BATCH, 3), dtype=np.int64)
    out_of_vocabulary = np.full((BATCH, MODEL["block_size"]), MODEL["vocab_size"], dtype=np.int64)
    cases = [
        ("a model tp does not divide", lambda: tensor_parallel_pieces(bad, tp_comm), ConfigError,
         [f"n_head (3) must be divisible by tp ({tp})", f"vocab_size (15) must be divisible by tp ({tp})"]),
        ("a sequence tp does not divide", lambda: embedding(odd_length), ConfigError,
         [f"sequence length 3 must be divisible by tp ({tp})"]),
        ("ids outside the vocabulary", lambda: embedding(out_of_vocabulary), ShapeError, ["ids must lie in [0, 16)"]),
        ("a target outside the vocabulary that is not the padding value",
         lambda: VocabParallelCrossEntropy.apply(Tensor(np.zeros((1, 2, 16 // tp))), np.array([[PADDING, 16]]),
                                                 communicator=tp_comm, vocab_start=0, ignore_index=PADDING),
         ShapeError, ["targets must lie in [0, 16) or equal ignore_index -100", "from 16 to 16"]),
    ]
    for what, call, error_type, phrases in cases:
        kind, message, agreed = raised(tp_comm, call)
        compare.value(f"bad input, {what}: (error, phrases found, same message on every rank)",
                      [kind, [phrase in message for phrase in phrases], agreed],
                      [error_type.__name__, [True] * len(phrases), True])


def run_all_checks(comm):
    """Every check on this rank; returns the comparisons for pytest to judge."""
    set_default_dtype(np.float64)
    world, compare = Communicator(comm), Comparisons()
    traffic = {}
    for sequence_parallel in (False, True):
        traffic[sequence_parallel] = check_equivalence(compare, world, sequence_parallel)
        compare.checks.append(f"equivalence sp={sequence_parallel}")
        check_dropout(compare, world, sequence_parallel)
        compare.checks.append(f"dropout sp={sequence_parallel}")
    # Korthikanti et al. 2022: the all-gathers and reduce-scatters move what the allreduces did.
    for direction in (0, 1):
        compare.value(f"bytes of a block {('forward', 'backward')[direction]}: sequence parallel against plain",
                      block_bytes(traffic[True][direction][1]), block_bytes(traffic[False][direction][1]))
    check_loss_with_padding(compare, world)
    compare.checks.append("loss with padding")
    check_bad_input(compare, world)
    compare.checks.append("bad input")
    if world.size == 4:  # two tensor-parallel groups side by side in a dp 2 x tp 2 grid
        grid = ProcessGrid(Layout(dp=2, tp=2), world)
        for sequence_parallel in (False, True):
            check_equivalence(compare, grid.tp, sequence_parallel, with_training=False)
        compare.checks.append("equivalence in the tp groups of dp 2 x tp 2")
    return compare.report()
