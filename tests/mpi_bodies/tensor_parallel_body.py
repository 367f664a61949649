"""Checks for minipar.parallel.tensor_parallel, run on every rank by tests/test_tensor_parallel.py.

One launch per world size; the tensor-parallel group is the whole world (tp = N), plus,
on 4 ranks, the two tp groups of a dp 2 x tp 2 grid. Everything runs in float64 and is
compared with the single-process GPT on the same batch: the sharded model is the same
computation with the sums split across ranks, so only rounding differs (rtol 1e-10).
"""
import numpy as np

from minipar.backend import set_default_dtype, xp
from minipar.comm import Communicator
from minipar.errors import ConfigError, ShapeError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.optim import AdamW
from minipar.parallel.tensor_parallel import (
    ReplicatedPartialGradientParameter,
    finish_tensor_parallel_gradients,
    tensor_parallel_pieces,
)
from minipar.parallel.topology import Layout, ProcessGrid
from minipar.tensor import Tensor

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


def joined(parameter, array, communicator):
    """The full single-process array from every tp rank's shard (raw MPI: no counters touched)."""
    local = xp.ascontiguousarray(array).reshape(-1)
    parts = xp.empty((communicator.size, local.size), dtype=local.dtype)
    communicator.mpi.Allgather(local, parts)
    parts = [part.reshape(array.shape) for part in parts]
    if parameter.shard.is_replicated:
        for rank, part in enumerate(parts):  # replicated parameters must agree across the group
            np.testing.assert_allclose(part, parts[0], rtol=RTOL, atol=0,
                                       err_msg=f"{parameter.shard.full_name}: tp rank {rank} differs from rank 0")
    return parameter.shard.join(parts)


def assert_close(actual, expected, what):
    scale = float(np.abs(expected).max()) if np.size(expected) else 0.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-12 * scale, err_msg=what)


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


def check_traffic(counters, expected, tp, what):
    """Calls and elements exactly; bytes from the ring model: allreduce 2(t-1)/t n, the others (t-1)/t n."""
    got = {name: (record["calls"], record["elements"]) for name, record in counters.items()}
    assert got == expected, f"{what}: traffic {got}, expected {expected}"
    for name, (_, elements) in expected.items():
        factor = 2 if name == "allreduce" else 1
        expected_bytes = factor * (tp - 1) * elements * 8 // tp
        assert counters[name]["bytes_sent"] == expected_bytes, (
            f"{what}: {name} sent {counters[name]['bytes_sent']} bytes, expected {expected_bytes}")


def block_bytes(traffic):
    return sum(record["bytes_sent"] for record in traffic.values())


def check_equivalence(tp_comm, sequence_parallel, with_training=True):
    config = GPTConfig(**MODEL)
    tp, label = tp_comm.size, f"tp={tp_comm.size} sp={sequence_parallel}"
    reference = GPT(config)
    pieces = tensor_parallel_pieces(config, tp_comm, sequence_parallel)
    parameters = unique_parameters(pieces)
    full_state = reference.state_dict()
    assert sorted(p.shard.full_name for p in parameters) == sorted(full_state), label
    for p in parameters:  # built as exact slices of the single-process initial weights
        np.testing.assert_array_equal(p.data, p.shard.take(full_state[p.shard.full_name]), err_msg=p.shard.full_name)
    partial_gradient = ReplicatedPartialGradientParameter
    sequence_sharded = sorted(p.shard.full_name for p in parameters if isinstance(p, partial_gradient))
    # Under SP: every LayerNorm, the position embedding and the row-parallel (output) biases.
    expected_sharded = sorted(n for n in full_state
                              if "norm" in n or n == "embedding.position.weight" or n.endswith("output.bias"))
    assert sequence_sharded == (expected_sharded if sequence_parallel else []), f"{label}: {sequence_sharded}"

    ids, targets = batch(config, seed=5)
    loss, forward, backward, shapes = run_pieces(pieces, ids, targets, tp_comm)
    local_length = config.block_size // (tp if sequence_parallel else 1)
    assert shapes == [(BATCH, local_length, config.n_embd)] * (config.n_layer + 1), f"{label}: {shapes}"
    expected = expected_traffic(config, sequence_parallel, tp)
    for index, (fwd, bwd) in enumerate(expected):
        check_traffic(forward[index], fwd, tp, f"{label} piece {index} forward")
        check_traffic(backward[index], bwd, tp, f"{label} piece {index} backward")
    # Narayanan et al. 2021: a layer moves 8 b s h (t-1)/t elements per micro-batch, forward plus backward.
    per_layer = block_bytes(forward[1]) + block_bytes(backward[1])
    assert per_layer == 8 * BATCH * config.block_size * config.n_embd * (tp - 1) // tp * 8, label

    tp_comm.reset_counters()
    finish_tensor_parallel_gradients(parameters, tp_comm)
    finishing = {name: (r["calls"], r["elements"]) for name, r in tp_comm.counters_snapshot().items()}
    summed = sum(p.size for p in parameters if isinstance(p, ReplicatedPartialGradientParameter))
    assert finishing == ({"allreduce": (1, summed)} if sequence_parallel else {}), f"{label}: {finishing}"

    _, reference_loss = reference(ids, targets)
    reference_loss.backward()
    assert_close(loss.item(), reference_loss.item(), f"{label}: loss")
    reference_grads = {name: p.grad for name, p in reference.named_parameters()}
    for p in parameters:
        assert p.grad is not None, f"{label}: {p.shard.full_name} got no gradient"
        assert_close(joined(p, p.grad, tp_comm), reference_grads[p.shard.full_name],
                     f"{label}: grad of {p.shard.full_name}")
    x = ids
    for piece in pieces[:-1]:
        x = piece(x)
    assert_close(pieces[-1].logits(x).data, reference(ids)[0].data, f"{label}: gathered logits")
    if with_training:
        check_training(config, reference, pieces, parameters, tp_comm, label)
    return forward, backward


def check_training(config, reference, pieces, parameters, tp_comm, label):
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
        assert_close(loss.item(), reference_loss.item(), f"{label}: loss at step {step}")
    # Compare what training changed, to 1e-10 of the largest change in each tensor. (Adam divides
    # by sqrt(v) + eps, so a gradient that is zero in exact arithmetic, like the key bias's, under
    # which softmax is shift invariant, turns rounding noise into moves of ~1e-14 in either run.)
    final = reference.state_dict()
    for p in parameters:
        name = p.shard.full_name
        expected_change = final[name] - initial[name]
        np.testing.assert_allclose(joined(p, p.data, tp_comm) - initial[name], expected_change, rtol=RTOL,
                                   atol=RTOL * float(np.abs(expected_change).max()),
                                   err_msg=f"{label}: change of {name} over {STEPS} AdamW steps")


def check_dropout(tp_comm, sequence_parallel):
    """With dropout the sharded model draws the single-process masks, so it still matches."""
    config = GPTConfig(**MODEL, dropout=0.2)
    label = f"dropout tp={tp_comm.size} sp={sequence_parallel}"
    reference, pieces = GPT(config), tensor_parallel_pieces(config, tp_comm, sequence_parallel)
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
    assert_close(loss.item(), reference_loss.item(), f"{label}: loss")
    reference_grads = {name: p.grad for name, p in reference.named_parameters()}
    for p in parameters:
        assert_close(joined(p, p.grad, tp_comm), reference_grads[p.shard.full_name], f"{label}: {p.shard.full_name}")


def same_error_everywhere(communicator, error_type, call):
    """``call()`` must raise ``error_type`` on every rank, with the same message everywhere."""
    try:
        call()
    except error_type as error:
        message = str(error)
    else:
        raise AssertionError(f"rank {communicator.rank}: expected {error_type.__name__}, nothing was raised")
    messages = communicator.mpi.allgather(message)  # small metadata: pickle is fine
    assert len(set(messages)) == 1, f"ranks disagree on the error: {messages}"
    return message


def check_bad_input(tp_comm):
    tp = tp_comm.size
    if tp == 1:
        return
    bad = GPTConfig(vocab_size=15, block_size=8, n_layer=1, n_head=3, n_embd=12)
    message = same_error_everywhere(tp_comm, ConfigError, lambda: tensor_parallel_pieces(bad, tp_comm))
    assert f"n_head (3) must be divisible by tp ({tp})" in message, message
    assert f"vocab_size (15) must be divisible by tp ({tp})" in message, message
    embedding = tensor_parallel_pieces(GPTConfig(**MODEL), tp_comm, sequence_parallel=True)[0]
    odd_length = np.zeros((BATCH, 3), dtype=np.int64)
    message = same_error_everywhere(tp_comm, ConfigError, lambda: embedding(odd_length))
    assert f"sequence length 3 must be divisible by tp ({tp})" in message, message
    out_of_vocabulary = np.full((BATCH, MODEL["block_size"]), MODEL["vocab_size"], dtype=np.int64)
    message = same_error_everywhere(tp_comm, ShapeError, lambda: embedding(out_of_vocabulary))
    assert "ids must lie in [0, 16)" in message, message


def run_all_checks(comm):
    set_default_dtype(np.float64)
    world = Communicator(comm)
    traffic = {}
    for sequence_parallel in (False, True):
        traffic[sequence_parallel] = check_equivalence(world, sequence_parallel)
        check_dropout(world, sequence_parallel)
    # Korthikanti et al. 2022: the all-gathers and reduce-scatters move what the allreduces did.
    for direction in (0, 1):
        assert block_bytes(traffic[True][direction][1]) == block_bytes(traffic[False][direction][1])
    check_bad_input(world)
    checks = 5
    if world.size == 4:  # two tensor-parallel groups side by side in a dp 2 x tp 2 grid
        grid = ProcessGrid(Layout(dp=2, tp=2), world)
        for sequence_parallel in (False, True):
            check_equivalence(grid.tp, sequence_parallel, with_training=False)
        checks += 1
    print(f"rank {world.rank}: all {checks} tensor-parallel checks passed on {world.size} ranks", flush=True)
