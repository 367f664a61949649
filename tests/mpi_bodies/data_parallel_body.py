"""Checks for minipar.parallel.data_parallel, run on every rank by tests/test_data_parallel.py.

Each rank also trains the same small GPT in one process on the whole global batch; every
data-parallel variant must reproduce those losses and parameters (float64, tight tolerance).
"""
import math

from minipar.backend import from_host, host_rng, set_default_dtype, xp
from minipar.comm import Communicator
from minipar.nn.gpt import GPT, GPTConfig
from minipar.nn.module import Parameter
from minipar.optim import AdamW, decay_groups
from minipar.parallel.data_parallel import (
    DataParallel,
    ReplicaDivergenceError,
    local_slice,
    scatter_batch,
    validate_data_parallel,
)
from tests.mpi_bodies.reporting import report

CONFIG = dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)
GLOBAL_BATCH = 16  # divisible by dp x micro-batches for dp up to 8 and 2 micro-batches
STEPS = 3
DATA_SEED = 2024
TOLERANCE = dict(rtol=1e-11, atol=1e-13)  # observed differences are about 5e-15

# (name, options for DataParallel, batch split, micro-batches per step). Steps begin with
# dp.start_step() (the gradients are views of the buckets), except where the name says
# zero_grad: then .grad is None before backward and each gradient is copied into its bucket.
CASES = [
    ("one bucket, blocking mpi", dict(bucket_bytes=math.inf), "local", 1),
    ("per-parameter buckets, ring, scatter, zero_grad", dict(bucket_bytes=1, algorithm="ring"), "scatter", 1),
    ("2 KiB buckets, recursive doubling", dict(bucket_bytes=2048, algorithm="recursive_doubling"), "local", 1),
    ("2 KiB buckets, tree", dict(bucket_bytes=2048, algorithm="tree"), "scatter", 1),
    ("2 KiB buckets, overlap", dict(bucket_bytes=2048, overlap=True), "local", 1),
    ("per-parameter buckets, overlap, zero_grad", dict(bucket_bytes=1, overlap=True), "scatter", 1),
    ("accumulation, blocking ring", dict(bucket_bytes=2048, algorithm="ring", accumulation_steps=2), "local", 2),
    ("accumulation, overlap", dict(bucket_bytes=2048, overlap=True, accumulation_steps=2), "scatter", 2),
]


def global_batch(step):
    """The global batch of a step: the same on every rank, drawn from (seed, step)."""
    shape = (GLOBAL_BATCH, CONFIG["block_size"] + 1)
    tokens = host_rng([DATA_SEED, step]).integers(0, CONFIG["vocab_size"], size=shape)
    tokens = from_host(tokens)
    return xp.ascontiguousarray(tokens[:, :-1]), xp.ascontiguousarray(tokens[:, 1:])


def new_model_and_optimizer():
    set_default_dtype(xp.float64)
    model = GPT(GPTConfig(**CONFIG))
    optimizer = AdamW(decay_groups(model.named_parameters(), 0.1), lr=1e-2)
    return model, optimizer


def gradients(model):
    return {name: p.grad.copy() for name, p in model.named_parameters()}


def single_process_run():
    """Losses, gradients of every step and the final parameters of one process on the whole batch."""
    model, optimizer = new_model_and_optimizer()
    losses, grads = [], []
    for step in range(STEPS):
        inputs, targets = global_batch(step)
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        grads.append(gradients(model))
        optimizer.step()
        losses.append(loss.item())
    return losses, grads, model.state_dict()


def data_parallel_run(communicator, options, split, micro_batches, zero_grad=False):
    """Losses (global means), the model, averaged gradients and counters of each step, ``dp``, and
    per step the parameters whose .grad after the sync is not a view of a bucket."""
    model, optimizer = new_model_and_optimizer()
    dp = DataParallel(model.parameters(), communicator, **options)
    losses, grads, counters, not_views = [], [], [], []
    flats = [bucket.flat for bucket in dp.buckets]
    for step in range(STEPS):
        communicator.reset_counters()
        if not zero_grad:
            dp.start_step()
        if split == "local":
            inputs, targets = local_slice(global_batch(step), communicator.rank, communicator.size)
        else:  # only rank 0 samples the batch; the others receive their rows
            batch = global_batch(step) if communicator.rank == 0 else (None, None)
            inputs, targets = scatter_batch(*batch, communicator)
            expected = local_slice(global_batch(step), communicator.rank, communicator.size)
            assert (inputs == expected[0]).all() and (targets == expected[1]).all(), "scatter_batch rows"
        rows = inputs.shape[0] // micro_batches
        local_loss = 0.0
        for micro in range(micro_batches):
            _, loss = model(inputs[micro * rows:(micro + 1) * rows], targets[micro * rows:(micro + 1) * rows])
            (loss * (1.0 / micro_batches)).backward()
            local_loss += loss.item() / micro_batches
        dp.finish_gradient_sync()
        counters.append(communicator.counters_snapshot())
        grads.append(gradients(model))
        not_views.append(sorted(name for name, p in model.named_parameters()
                                if not any(p.grad.base is flat for flat in flats)))
        optimizer.step()
        if zero_grad:
            optimizer.zero_grad()
        losses.append(communicator.allreduce(xp.array([local_loss])).item() / communicator.size)
    return losses, model, grads, counters, dp, not_views


def tolerance_ratio(actual, expected):
    """max |actual - expected| / (atol + rtol |expected|) over the elements: at most 1 where allclose holds."""
    actual, expected = xp.asarray(actual), xp.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} vs {expected.shape}"
    return float(xp.max(xp.abs(actual - expected) / (TOLERANCE["atol"] + TOLERANCE["rtol"] * xp.abs(expected))))


def expected_bytes_sent(algorithm, gradient_bytes, size):
    """Bytes one rank sends per step for the allreduce of all gradients (power-of-two sizes)."""
    if size == 1:
        return 0
    if algorithm in ("mpi", "ring"):  # MPI's built-in is counted with the ring's textbook volume
        return 2 * (size - 1) * gradient_bytes // size
    if algorithm == "recursive_doubling":
        return gradient_bytes * int(math.log2(size))
    raise ValueError(algorithm)


def traffic_checks(communicator, name, options, split, counters, dp, gradient_bytes):
    size = communicator.size
    algorithm = options.get("algorithm", "mpi")
    key = "iallreduce" if options.get("overlap") else "allreduce"
    checks = []
    for step, snapshot in enumerate(counters):
        record = snapshot[key]
        what = f"{name}: step {step}, rank {communicator.rank}"
        sent = record["bytes_sent"]
        everyone = communicator.mpi.allgather(sent)
        # Summed over ranks, every one of these allreduces sends 2(N-1) copies of the data
        # except recursive doubling, which sends N lg N copies.
        copies = size * int(math.log2(size)) if algorithm == "recursive_doubling" else 2 * (size - 1)
        # Besides the gradient allreduces, only the batch scatter (when rank 0 scatters) may appear.
        checks += [(f"{what}: {key} calls, one per bucket", record["calls"], "==", len(dp.buckets)),
                   (f"{what}: bytes reduced", record["elements"] * 8, "==", gradient_bytes),
                   (f"{what}: calls made", sorted(snapshot), "==", sorted({key, "scatter"} if split == "scatter"
                                                                           else {key})),
                   (f"{what}: bytes sent by all ranks", sum(everyone), "==", copies * gradient_bytes)]
        if algorithm == "tree":  # rank 0 sends the whole gradient to each of its lg N children
            checks.append((f"{what}: bytes sent by the root", everyone[0], "==", gradient_bytes * int(math.log2(size))))
        else:
            checks.append((f"{what}: bytes sent", sent, "==", expected_bytes_sent(algorithm, gradient_bytes, size)))
    return checks


def equivalence_checks(communicator):
    """Every case against one process: losses, the gradients right after the sync (before AdamW),
    the parameters after the steps, and the traffic, as (what, got, relation, expected)."""
    reference_losses, reference_grads, reference_state = single_process_run()
    checks = []
    for name, options, split, micro_batches in CASES:
        losses, model, grads, counters, dp, not_views = data_parallel_run(
            communicator, options, split, micro_batches, zero_grad="zero_grad" in name)
        checks.append((f"{name}: parameters whose averaged .grad is not a view of a bucket, per step",
                       not_views, "==", [[]] * STEPS))
        checks.append((f"{name}: losses, tolerance ratio", tolerance_ratio(losses, reference_losses), "<=", 1.0))
        for step, (step_grads, reference_step_grads) in enumerate(zip(grads, reference_grads, strict=True)):
            checks.append((f"{name}: step {step} gradients after the sync, tolerance ratio per parameter",
                           {key: tolerance_ratio(grad, reference_step_grads[key]) for key, grad in step_grads.items()},
                           "all <=", 1.0))
        checks.append((f"{name}: parameters after the steps, tolerance ratio per parameter",
                       {key: tolerance_ratio(value, reference_state[key]) for key, value in model.state_dict().items()},
                       "all <=", 1.0))
        parameters = model.parameters()
        assert all(p.size % communicator.size == 0 for p in parameters), "test assumes sizes divisible by N"
        gradient_bytes = sum(p.data.nbytes for p in parameters)
        checks.append((f"{name}: gradient bytes", dp.gradient_bytes, "==", gradient_bytes))
        checks += traffic_checks(communicator, name, options, split, counters, dp, gradient_bytes)
        dp.check_replicas()
    return checks


def check_buckets(communicator):
    """How the parameters are packed into buckets, as (what, got, relation, expected)."""
    model, _ = new_model_and_optimizer()
    parameters = model.parameters()
    name_of = {id(p): name for name, p in model.named_parameters()}
    one = DataParallel(parameters, communicator, bucket_bytes=math.inf)
    each = DataParallel(parameters, communicator, bucket_bytes=1)
    sized = DataParallel(parameters, communicator, bucket_bytes=2048)
    order = [name_of[id(slot.parameter)] for bucket in sized.buckets for slot in bucket.slots]
    checks = [("buckets: bucket_bytes=inf makes one bucket", len(one.buckets), "==", 1),
              ("buckets: that bucket holds every element", int(one.buckets[0].flat.size), "==",
               sum(p.size for p in parameters)),
              ("buckets: bucket_bytes=1 makes one bucket per parameter", len(each.buckets), "==", len(parameters)),
              ("buckets: 2 KiB buckets hold the parameters in reverse order", order, "==",
               [name_of[id(p)] for p in parameters[::-1]])]
    for index, bucket in enumerate(sized.buckets):
        checks.append((f"buckets: 2 KiB bucket {index} ({bucket.flat.nbytes} B, {len(bucket.slots)} parameters) "
                       "is at most 2048 B or holds one parameter",
                       bucket.flat.nbytes <= 2048 or len(bucket.slots) == 1, "==", True))
    for index, (first, second) in enumerate(zip(sized.buckets, sized.buckets[1:], strict=False)):
        checks.append((f"buckets: greedy packing, bucket {index} plus the next one's first parameter (bytes)",
                       first.flat.nbytes + second.slots[0].parameter.data.nbytes, ">", 2048))
    return checks


def check_broadcast(communicator):
    """A rank that starts from other weights gets rank 0's at construction."""
    model, _ = new_model_and_optimizer()
    pristine = model.state_dict()
    if communicator.rank != 0:
        for p in model.parameters():
            p.data += communicator.rank
    DataParallel(model.parameters(), communicator).check_replicas()
    return [(f"broadcast: rank {communicator.rank}'s {name} minus rank 0's, largest |difference|",
             float(xp.abs(value - pristine[name]).max()), "==", 0.0)
            for name, value in model.state_dict().items()]


def check_divergence_detected(communicator):
    """check_replicas names the one rank and the one parameter that drifted, on every rank."""
    model, _ = new_model_and_optimizer()
    dp = DataParallel(model.parameters(), communicator, check_interval=5)
    checks = [("divergence: check_replicas at step 3 (not a checking step)", dp.check_replicas(step=3), "==", None)]
    dp.check_replicas(step=5)
    if communicator.size == 1:
        return checks
    culprits = [communicator.size - 1, 0] if communicator.size >= 3 else [communicator.size - 1]
    target_name, target = "blocks.1.mlp.hidden.weight", dict(model.named_parameters())["blocks.1.mlp.hidden.weight"]
    for culprit in culprits:
        saved = target.data.copy()
        if communicator.rank == culprit:
            target.data[0, 0] += 1e-9
        message = ""
        try:
            dp.check_replicas()
        except ReplicaDivergenceError as error:
            message = str(error)
        what = f"divergence: rank {culprit} perturbed, the message on rank {communicator.rank}"
        checks += [(what, message, "contains", f"ranks [{culprit}] disagree"),
                   (what, message, "contains", target_name),
                   (what, message, "contains", "sum of squares"),
                   (f"{what}: lines (only the perturbed parameter listed)", message.count("\n"), "==", 1)]
        target.data[...] = saved
    dp.check_replicas()
    return checks


def outcome_of(attempt):
    """What calling ``attempt()`` raised, as text: the exception's type, or "no error"."""
    try:
        attempt()
    except Exception as error:  # noqa: BLE001 - the kind of error is what is checked
        return type(error).__name__ + ("" if str(error) else " without a message")
    return "no error"


def check_bad_inputs(communicator):
    """Every bad setup raises ConfigError on every rank, and no rank is left waiting."""
    size = communicator.size
    model, _ = new_model_and_optimizer()
    parameters = model.parameters()
    attempts = [
        ("indivisible batch", lambda: validate_data_parallel(4 * size + 1, size, size, 1024, accumulation_steps=2)),
        ("wrong world size", lambda: validate_data_parallel(16, size, size + 1, 1024)),
        ("zero bucket", lambda: validate_data_parallel(16, size, size, 0)),
        ("negative bucket", lambda: DataParallel(parameters, communicator, bucket_bytes=-5)),
        ("overlap with ring", lambda: DataParallel(parameters, communicator, overlap=True, algorithm="ring")),
        ("unknown algorithm", lambda: DataParallel(parameters, communicator, algorithm="butterfly")),
        ("zero accumulation", lambda: DataParallel(parameters, communicator, accumulation_steps=0)),
        ("scatter without data", lambda: scatter_batch(None, None, communicator)),
        ("local slice indivisible", lambda: local_slice(global_batch(0)[0][:2 * size + 1], 0, 2 * size + 2)),
    ]
    if size > 1:  # rank 0's batch does not split; one rank with another model (not a hang)
        odd_rows = global_batch(0)[0][:size + 1]
        attempts.append(("scatter indivisible", lambda: scatter_batch(odd_rows, odd_rows, communicator)))
        other = GPT(GPTConfig(**{**CONFIG, "n_embd": 8}))
        mine = other.parameters() if communicator.rank == size - 1 else parameters
        attempts.append(("different models", lambda: DataParallel(mine, communicator)))
    checks = []
    for label, attempt in attempts:
        checks.append((f"bad inputs: {label}, on rank {communicator.rank}", outcome_of(attempt), "==", "ConfigError"))
        communicator.mpi.Barrier()  # proves no rank is stuck inside the failed call
    raised = sum(outcome == "ConfigError" for _, outcome, _, _ in checks)
    checks.append(("bad inputs: ConfigErrors on each rank", communicator.mpi.allgather(raised), "==",
                   [len(attempts)] * size))

    # Overlap mode: one backward pass too many in a step is an error, not a silent double count.
    model, _ = new_model_and_optimizer()
    DataParallel(model.parameters(), communicator, overlap=True, accumulation_steps=1)  # its hooks must refuse
    inputs, targets = local_slice(global_batch(0), communicator.rank, size)
    model(inputs, targets)[1].backward()
    message = "no error"
    try:
        model(inputs, targets)[1].backward()
    except RuntimeError as error:
        message = str(error)
    checks.append(("bad inputs: a second backward pass in one step (overlap, accumulation_steps 1)", message,
                   "contains", "expected 1 (accumulation_steps is 1)"))
    return checks


def run_all_checks(comm):
    """Buckets, the broadcast, the equivalence with one process, divergence and bad inputs, reported."""
    communicator = Communicator(comm)
    checks = check_buckets(communicator) + check_broadcast(communicator) + equivalence_checks(communicator)
    checks += check_divergence_detected(communicator) + check_bad_inputs(communicator)
    return report(["buckets", "broadcast", "equivalence", "divergence", "bad inputs"], checks)


def raise_config_error_uncaught(comm):
    """A bad bucket size left uncaught must end the job with a message, not hang it."""
    set_default_dtype(xp.float64)
    model = GPT(GPTConfig(**CONFIG))
    DataParallel(model.parameters(), Communicator(comm), bucket_bytes=0)
    comm.Barrier()


def unused_gradients_are_zero(comm):
    """A parameter that gets no gradient on rank 0 is averaged as zero there, and nothing hangs.

    ``extra`` is used only on ranks r > 0, where its gradient is r + 1 in every element, so
    the average is (1/N) * sum over r > 0 of (r + 1). It sits last in the list, so in the
    first bucket: with overlap, rank 0 cannot launch any bucket before finish_gradient_sync.
    """
    communicator = Communicator(comm)
    rank, size = communicator.rank, communicator.size
    checks = []
    for overlap in (False, True):
        model, _ = new_model_and_optimizer()
        extra = Parameter(xp.ones(8))
        dp = DataParallel(model.parameters() + [extra], communicator, bucket_bytes=2048, overlap=overlap)
        inputs, targets = local_slice(global_batch(0), rank, size)
        loss = model(inputs, targets)[1]
        if rank > 0:
            loss = loss + (extra * float(rank + 1)).sum()
        loss.backward()
        dp.finish_gradient_sync()
        expected = sum(r + 1 for r in range(1, size)) / size
        checks.append((f"overlap {overlap}, rank {rank}: the unused parameter's gradient",
                       None if extra.grad is None else extra.grad.tolist(), "==", [expected] * 8))
        dp.check_replicas()
    return report(["unused gradients"], checks)


def shared_parameter_reached_twice(comm):
    """A parameter that two backward calls per micro-batch reach (as when two pipeline chunks
    on one rank share it) is sent only after its last contribution, given uses_per_micro_batch.

    Rank r, micro-batch i, backward call j adds (r + 1) * (1 + i + 2 j) to every element of
    ``shared``'s gradient; the average over ranks of the sum over i, j is known exactly.
    Without uses_per_micro_batch the third hook call is refused.
    """
    communicator = Communicator(comm)
    rank, size = communicator.rank, communicator.size
    micro_batches = 2
    checks = []
    expected = sum(r + 1 for r in range(size)) * sum(1 + i + 2 * j for i in range(2) for j in range(2)) / size
    for declared in (True, False):
        shared, other = Parameter(xp.ones(8)), Parameter(xp.ones(8))
        uses = {shared: 2} if declared else None
        dp = DataParallel([other, shared], communicator, overlap=True, bucket_bytes=1,
                          accumulation_steps=micro_batches, uses_per_micro_batch=uses)
        try:
            for i in range(micro_batches):
                for j in range(2):
                    loss = (shared * float((rank + 1) * (1 + i + 2 * j))).sum()
                    if j == 1:
                        loss = loss + other.sum()
                    loss.backward()
            dp.finish_gradient_sync()
            message = "no error"
        except RuntimeError as error:
            message = str(error)
        if declared:
            checks += [(f"rank {rank}: the shared parameter's gradient", shared.grad.tolist(), "==", [expected] * 8),
                       (f"rank {rank}: the other parameter's gradient", other.grad.tolist(), "==",
                        [float(micro_batches)] * 8),
                       (f"rank {rank}: declared second use", message, "==", "no error")]
        else:
            checks.append((f"rank {rank}: undeclared second use refused", message, "contains",
                           "got a gradient 3 times in one step, expected 2"))
    return report(["shared parameter"], checks)
