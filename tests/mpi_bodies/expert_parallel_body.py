"""Checks for all-to-all and expert parallelism, run on every rank by tests/test_expert_parallel.py.

Everything is compared on the rank and returned (tests/mpi_bodies/comparisons.py):

- ``check_alltoall``: alltoall and alltoallv, MPI's and the hand-built pairwise exchange, against
  the blocks every rank can compute for itself; the byte counters against (N−1)/N of the data.
- ``check_layer``: the expert-parallel MoE layer on ep = N ranks against the single-process
  layer with groups = N on the ranks' batches stacked (float64): outputs, the dropped choices,
  tokens per expert, the aux loss, and the gradients of the input, the router and every expert
  (gathered from their owners); the all-to-all bytes of forward and backward against
  2·CF·k·T·C·(N−1)/N elements each.
- ``check_model``: a small GPT whose blocks use the MoE layer in place of the MLP, on a
  dp x ep layout, against the single-process model: loss and every parameter's gradient after
  ``average_gradients``.
"""
import numpy as np

from minipar.comm import Communicator
from minipar.errors import ConfigError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.nn.moe import MixtureOfExperts, expert_parameter_ids
from minipar.parallel.expert_parallel import (
    ExpertParallelMixtureOfExperts,
    average_gradients,
    validate_expert_parallel,
)
from minipar.tensor import Tensor
from tests.mpi_bodies.comparisons import Comparisons

RTOL = 1e-10
DTYPES = (np.float32, np.float64)


# ---- all-to-all ---------------------------------------------------------------------------------------

def block(source, dest, rows, dtype, width=3):
    """What rank ``source`` sends rank ``dest``: ``rows`` rows of integers, reproducible anywhere."""
    generator = np.random.default_rng([source, dest, rows])
    return generator.integers(-50, 50, size=(rows, width)).astype(dtype)


def uneven_rows(source, dest):
    return (3 * source + 5 * dest) % 4  # includes empty blocks, and sizes that differ both ways


def check_alltoall(compare, world):
    rank, size = world.rank, world.size
    for dtype in DTYPES:
        name = np.dtype(dtype).name
        for algorithm in ("mpi", "pairwise"):
            for rows in (0, 1, 5):
                what = f"alltoall {algorithm} {name} rows per block {rows}"
                send = np.concatenate([block(rank, dest, rows, dtype) for dest in range(size)])
                expected = np.concatenate([block(source, rank, rows, dtype) for source in range(size)])
                out = np.full_like(send, np.nan)
                world.reset_counters()
                returned = world.alltoall(send, out, algorithm=algorithm)
                compare.true(what + ": returns out", returned is out)
                compare.arrays_equal(what, out, expected)
                record = world.counters["alltoall"]
                compare.value(what + ": bytes sent, received", [record.bytes_sent, record.bytes_received],
                              [send.nbytes * (size - 1) // size] * 2)
            send_counts = [uneven_rows(rank, dest) for dest in range(size)]
            receive_counts = world.exchange_counts(send_counts)
            compare.value(f"exchange_counts {algorithm} {name}", receive_counts,
                          [uneven_rows(source, rank) for source in range(size)])
            send = np.concatenate([block(rank, dest, send_counts[dest], dtype) for dest in range(size)])
            expected = np.concatenate([block(source, rank, receive_counts[source], dtype) for source in range(size)])
            out = np.full((sum(receive_counts), 3), np.nan, dtype=dtype)
            world.reset_counters()
            world.alltoallv(send, send_counts, out, receive_counts, algorithm=algorithm)
            compare.arrays_equal(f"alltoallv {algorithm} {name}", out, expected)
            record = world.counters["alltoallv"]
            item = np.dtype(dtype).itemsize * 3
            compare.value(f"alltoallv {algorithm} {name}: bytes sent, received", [record.bytes_sent, record.bytes_received],
                          [item * (sum(send_counts) - send_counts[rank]), item * (sum(receive_counts) - receive_counts[rank])])
    for bad, message in ((lambda: world.alltoall(np.zeros(size + 1), np.zeros(size + 1)), "divisible"),
                         (lambda: world.alltoallv(np.zeros(2), [2] + [0] * (size - 1), np.zeros(1), [1] * size), "rows")):
        if size > 1:
            try:
                bad()
                compare.true(f"bad all-to-all input raises ({message})", False)
            except Exception as error:  # noqa: BLE001 - the message is what we compare
                compare.true(f"bad all-to-all input raises ({message})", message in str(error), str(error))


# ---- the layer ------------------------------------------------------------------------------------------

WIDTH, EXPERTS, TOP_K, HIDDEN = 6, 8, 2, 5
TOKENS_PER_RANK = (2, 8)  # (B, T) on each rank: T_rank = 16 tokens


def reference_layer(capacity_factor, groups):
    moe = MixtureOfExperts(WIDTH, EXPERTS, TOP_K, capacity_factor, aux_loss_weight=0.1, hidden=HIDDEN, groups=groups)
    return moe.to("float64").reset_parameters(seed=5, std=0.6)


def joined_gradient(parameter, communicator):
    """The full gradient of a sharded (experts) parameter from every ep rank's slice, by raw MPI."""
    local = np.ascontiguousarray(parameter.grad)
    parts = np.empty((communicator.size, *local.shape), dtype=local.dtype)
    communicator.mpi.Allgather(local, parts)
    return parameter.shard.join(list(parts))


def close(compare, what, got, expected):
    scale = float(np.abs(expected).max()) if np.size(expected) else 0.0
    compare.arrays_close(what, got, expected, rtol=RTOL, atol=1e-13 * scale)


def check_layer(compare, world, capacity_factor, algorithm):
    """ep = world.size against the single-process layer with one group per rank."""
    rank, size = world.rank, world.size
    label = f"layer CF {capacity_factor} {algorithm}"
    generator = np.random.default_rng(11)
    inputs = generator.standard_normal((size, *TOKENS_PER_RANK, WIDTH))  # every rank's batch
    weights = generator.standard_normal(inputs.shape)  # L_r = mean(out_r * weights_r) (+ aux_r)

    reference = reference_layer(capacity_factor, groups=size)
    x_all = Tensor(inputs.reshape(-1, TOKENS_PER_RANK[1], WIDTH), requires_grad=True)
    out_all = reference(x_all)
    # The mean over ranks of the ranks' losses; the aux loss (attached in backward) is already the mean over groups.
    ((out_all * Tensor(weights.reshape(out_all.shape))).mean()).backward()

    ep_comm = Communicator(world.mpi.Dup())  # its own counters
    layer = ExpertParallelMixtureOfExperts(reference, ep_comm, algorithm=algorithm)
    x = Tensor(inputs[rank], requires_grad=True)
    ep_comm.reset_counters()
    out = layer(x)
    forward_record = dict(vars(ep_comm.counters["alltoall"]))
    ((out * Tensor(weights[rank])).mean()).backward()
    backward_record = vars(ep_comm.counters["alltoall"])
    average_gradients(layer.parameters(), expert_parameter_ids(layer), world, Communicator(world.mpi.Split(rank, 0)))

    rows = slice(rank * TOKENS_PER_RANK[0], (rank + 1) * TOKENS_PER_RANK[0])
    close(compare, f"{label}: output", out.data, out_all.data[rows])
    per_rank_tokens = TOKENS_PER_RANK[0] * TOKENS_PER_RANK[1]
    mine = slice(rank * per_rank_tokens, (rank + 1) * per_rank_tokens)
    compare.arrays_equal(f"{label}: dropped choices", layer.routing.slot < 0, reference.routing.slot[mine] < 0)
    compare.value(f"{label}: capacity", layer.routing.capacity, reference.routing.capacity)
    compare.value(f"{label}: tokens per expert, routed and kept",
                  [layer.routing.routed[0].tolist(), layer.routing.kept[0].tolist()],
                  [reference.routing.routed[rank].tolist(), reference.routing.kept[rank].tolist()])
    mean_aux = world.allreduce(np.array(layer.aux_loss.item())) / size
    close(compare, f"{label}: aux loss averaged over ranks", mean_aux, reference.aux_loss.data)
    close(compare, f"{label}: input gradient", x.grad / size, x_all.grad[rows])
    experts = expert_parameter_ids(layer)
    for (name, p), full in zip(layer.named_parameters(), reference.parameters()):
        got = joined_gradient(p, ep_comm) if id(p) in experts else p.grad
        close(compare, f"{label}: gradient of {name}", got, full.grad)

    # Bytes: each all-to-all sends all but this rank's E/N experts' share of the (E, C_e, C) slots.
    slots = EXPERTS * layer.routing.capacity * WIDTH
    per_call = slots * (size - 1) // size * 8
    compare.value(f"{label}: forward all-to-alls (calls, bytes sent, received)",
                  [forward_record["calls"], forward_record["bytes_sent"], forward_record["bytes_received"]],
                  [2, 2 * per_call, 2 * per_call])
    compare.value(f"{label}: backward all-to-alls (calls, bytes sent, received)",
                  [backward_record["calls"] - 2, backward_record["bytes_sent"] - 2 * per_call,
                   backward_record["bytes_received"] - 2 * per_call], [2, 2 * per_call, 2 * per_call])
    if capacity_factor == 1.0:  # E C_e = CF k T exactly here, so the formula holds to the byte
        formula = 2 * capacity_factor * TOP_K * per_rank_tokens * WIDTH * (size - 1) / size * 8
        compare.value(f"{label}: forward bytes sent = 2 CF k T C (N-1)/N elements", forward_record["bytes_sent"], formula)
    return layer.routing


# ---- a whole model ----------------------------------------------------------------------------------------

MODEL = dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8)
SEQUENCES_PER_RANK = 2


def with_experts(model, groups, capacity_factor):
    """The model with every block's MLP replaced by a mixture of experts (seeded per block)."""
    for index, block in enumerate(model.blocks):
        block.mlp = MixtureOfExperts(MODEL["n_embd"], EXPERTS, TOP_K, capacity_factor, 0.01, groups=groups)
        block.mlp.to("float64").reset_parameters(seed=100 + index, std=0.3)
    return model


def check_model(compare, world, dp, capacity_factor):
    """dp x ep = world; data rank = dp_rank * ep + ep_rank (ep varies faster, as the mesh orders it)."""
    rank, size = world.rank, world.size
    ep = size // dp
    label = f"model dp {dp} x ep {ep} CF {capacity_factor}"
    config = GPTConfig(**MODEL)
    generator = np.random.default_rng(3)
    ids = generator.integers(0, MODEL["vocab_size"], (size * SEQUENCES_PER_RANK, MODEL["block_size"]))
    targets = generator.integers(0, MODEL["vocab_size"], ids.shape)

    reference = with_experts(GPT(config, dtype="float64"), groups=size, capacity_factor=capacity_factor)
    _, reference_loss = reference(ids, targets)
    reference_loss.backward()

    ep_comm = world.split(color=rank // ep, key=rank)  # ranks dp_rank*ep ... dp_rank*ep + ep-1
    expert_data_comm = world.split(color=rank % ep, key=rank)  # the same experts, one per dp rank
    model = GPT(config, dtype="float64")
    for index, block in enumerate(model.blocks):
        block.mlp = ExpertParallelMixtureOfExperts(reference.blocks[index].mlp, ep_comm, prefix=f"blocks.{index}.mlp.")
    mine = slice(rank * SEQUENCES_PER_RANK, (rank + 1) * SEQUENCES_PER_RANK)
    _, loss = model(ids[mine], targets[mine])
    loss.backward()
    experts = expert_parameter_ids(model)
    average_gradients(model.parameters(), experts, world, expert_data_comm)

    close(compare, f"{label}: loss averaged over ranks", world.allreduce(np.array(loss.item())) / size,
          reference_loss.data)
    full = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        got = joined_gradient(p, ep_comm) if id(p) in experts else p.grad
        close(compare, f"{label}: gradient of {name}", got, full[name].grad)
    dropped = sum(int((b.mlp.routing.routed - b.mlp.routing.kept).sum()) for b in model.blocks)
    return world.allreduce(np.array(dropped))


def check_bad_layouts(compare):
    for experts, ep, data, message in ((8, 3, 6, "experts (8) must be divisible by ep (3)"),
                                       (8, 4, 6, "ep (4) must divide the data-parallel ranks (6)"),
                                       (8, 0, 8, "ep must be a positive integer")):
        try:
            validate_expert_parallel(experts, ep, data)
            compare.true(f"ep {ep} with {experts} experts on {data} ranks raises", False)
        except ConfigError as error:
            compare.true(f"ep {ep} with {experts} experts on {data} ranks names the numbers", message in str(error),
                         str(error))


def run_all_checks(comm, layouts=None, algorithms=("mpi", "pairwise")):
    world, compare = Communicator(comm), Comparisons()
    check_alltoall(compare, world)
    compare.checks.append("alltoall")
    drops = {}
    if EXPERTS % world.size == 0:
        for algorithm in algorithms:
            check_layer(compare, world, capacity_factor=EXPERTS / TOP_K, algorithm=algorithm)  # capacity T: no drops
            routing = check_layer(compare, world, capacity_factor=1.0, algorithm=algorithm)
            drops[algorithm] = int((routing.routed - routing.kept).sum())
        compare.checks.append("layer")
        total = int(world.allreduce(np.array(drops[algorithms[0]])))
        compare.true("CF 1.0 drops some choices somewhere (the drop check is not vacuous)", total > 0, f"{total}")
        for dp in layouts if layouts is not None else [1]:
            no_drops = check_model(compare, world, dp, capacity_factor=EXPERTS / TOP_K)
            compare.value(f"model dp {dp}: choices dropped at CF E/k", int(no_drops), 0)
            with_drops = check_model(compare, world, dp, capacity_factor=0.5)
            compare.true(f"model dp {dp}: CF 0.5 drops some choices", int(with_drops) > 0, f"{int(with_drops)}")
        compare.checks.append("model")
    check_bad_layouts(compare)
    compare.checks.append("bad layouts")
    return compare.report()
