"""Pipeline-parallel training checked against one process, run on every rank by tests/test_pipeline.py.

Each case trains for STEPS AdamW steps in float64 with p = world size stages, then rank 0 gathers
every stage's parameters by their single-process name (``shard.full_name``; names as pickled
metadata, arrays with Send/Recv) and compares them, and the step losses, with single-process
training on the same global batches. The reference is one step on the whole batch, so it does not
depend on the number of micro-batches: it is computed once per model and reused by every case.

Every executor talks through a ``SendBufferWatch``: a send buffer must not be handed to another
``isend`` or change while its send is in flight (MPI leaves the result undefined; with small
messages sent eagerly the bug passes unseen). Every comparison is recorded
(tests/mpi_bodies/comparisons.py) and returned to pytest.
"""
from itertools import pairwise

from minipar.backend import from_host, host_rng, set_default_dtype, xp
from minipar.comm import Communicator
from minipar.errors import ConfigError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.nn.layers import Linear
from minipar.nn.module import Module
from minipar.optim import AdamW
from minipar.parallel.pipeline.executor import PipelineExecutor, split_microbatches
from minipar.parallel.pipeline.partition import (
    TIED_EMBEDDING,
    TiedEmbeddingGradientSum,
    partition,
    stage_parameters,
)
from minipar.parallel.pipeline.schedules import RECEIVES, placement_of
from minipar.parallel.sharding import label_replicated
from minipar.trace import Timeline
from tests.mpi_bodies.comparisons import Comparisons

STEPS = 3
BATCH = 48  # divisible by every micro-batch count the tests use (1, 2, 3, 4, 8, 16)
LENGTH = 5
RTOL, ATOL = 1e-9, 1e-12


def gpt_config(n_layer=8):
    return GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=8, seed=7)


def gpt_batches(config):
    """The global batch of each step: the same on every rank, drawn from (seed, step)."""
    batches = []
    for step in range(STEPS):
        generator = host_rng([config.seed, step])
        ids = from_host(generator.integers(0, config.vocab_size, (BATCH, LENGTH)))
        targets = from_host(generator.integers(0, config.vocab_size, (BATCH, LENGTH)))
        batches.append((ids, targets))
    return batches


# ---- a plain MLP as a chain of pieces ----------------------------------------------------------

class TanhLayer(Module):
    def __init__(self, width_in, width_out, generator):
        self.linear = Linear(width_in, width_out)
        self.linear.weight.data[...] = from_host(generator.normal(0, 1 / width_in**0.5, (width_in, width_out)))
        self.linear.bias.data[...] = from_host(generator.normal(0, 0.1, width_out))

    def forward(self, x):
        return self.linear(x).tanh()


class SquaredErrorHead(Module):
    def __init__(self, width_in, width_out, generator):
        self.linear = Linear(width_in, width_out)
        self.linear.weight.data[...] = from_host(generator.normal(0, 1 / width_in**0.5, (width_in, width_out)))

    def forward(self, x, targets):
        error = self.linear(x) - targets
        return (error * error).mean()


class MLPStack(Module):
    """[input layer, hidden layers..., head]: what an MLP looks like to ``partition``."""

    def __init__(self, width=6, hidden_layers=8, seed=3):
        generator = host_rng(seed)
        self.layers = [TanhLayer(4, width, generator)]
        self.layers += [TanhLayer(width, width, generator) for _ in range(hidden_layers)]
        self.layers.append(SquaredErrorHead(width, 2, generator))
        label_replicated(self)

    def pieces(self):
        return list(self.layers)

    def loss(self, x, targets):
        for layer in self.layers[:-1]:
            x = layer(x)
        return self.layers[-1](x, targets)


def mlp_batches():
    batches = []
    for step in range(STEPS):
        generator = host_rng([11, step])
        batches.append((from_host(generator.normal(size=(BATCH, 4))), from_host(generator.normal(size=(BATCH, 2)))))
    return batches


# ---- a communicator that watches its send buffers ------------------------------------------------

class SendBufferWatch:
    """The wrapped Communicator, with every ``isend``'s buffer watched until its request completes.

    A buffer still in flight must not be passed to another ``isend`` nor be written to; both are
    recorded in ``violations``. Everything else goes to the wrapped communicator.
    """

    def __init__(self, communicator):
        self._communicator = communicator
        self.in_flight = []  # [buffer, copy at isend time, tag]
        self.violations, self.sends = [], 0

    def __getattr__(self, name):
        return getattr(self._communicator, name)

    def check_in_flight(self, when):
        for buffer, copy, tag in self.in_flight:
            if not xp.array_equal(buffer, copy):
                self.violations.append(f"the buffer of the send with tag {tag} changed while in flight ({when})")
                copy[...] = buffer  # report each change once

    def isend(self, array, dest, tag=0):
        self.check_in_flight(f"at the isend with tag {tag}")
        for buffer, _, other_tag in self.in_flight:
            if xp.shares_memory(buffer, array):
                self.violations.append(f"isend with tag {tag} reuses the buffer of tag {other_tag}, still in flight")
        request = self._communicator.isend(array, dest, tag)
        entry = [array, array.copy(), tag]
        self.in_flight.append(entry)
        self.sends += 1
        return _WatchedRequest(self, request, entry)


class _WatchedRequest:
    def __init__(self, watch, request, entry):
        self._watch, self._request, self._entry = watch, request, entry

    def _completed(self):
        if self._entry in self._watch.in_flight:
            self._watch.check_in_flight(f"when the send with tag {self._entry[2]} completed")
            self._watch.in_flight.remove(self._entry)

    def test(self):
        done = self._request.test()
        if done:
            self._completed()
        return done

    def wait(self):
        result = self._request.wait()
        self._completed()
        return result


def record_send_buffers(compare, label, watch):
    compare.value(f"{label}: send-buffer misuse on rank {watch.rank} (count, first three)",
                  [len(watch.violations), watch.violations[:3]], [0, []])
    compare.value(f"{label}: sends still in flight after the steps", len(watch.in_flight), 0)


# ---- reference and pipeline training ------------------------------------------------------------

def train_single_process(model, loss_of, batches):
    """Losses and final parameters (by name) of STEPS AdamW steps on whole batches."""
    optimizer = AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    losses = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = loss_of(model, inputs, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: p.data.copy() for name, p in model.named_parameters()}


def train_pipeline(communicator, pieces, batches, schedule, microbatches, chunks_per_stage=1,
                   recompute=False, activation_tail=(), sum_tied=True, split=None):
    """Train the stage's chunks; returns (losses or None, {full name: array}, executor)."""
    chunks = partition(pieces, communicator.size, communicator.rank, chunks_per_stage, split, placement_of(schedule))
    named = stage_parameters(chunks)
    optimizer = AdamW([p for _, p in named], lr=0.02, weight_decay=0.1)
    activation_shape = (BATCH // microbatches, *activation_tail)
    executor = PipelineExecutor(chunks, SendBufferWatch(communicator), schedule, microbatches, activation_shape,
                                xp.float64, recompute=recompute, timeline=Timeline(communicator.rank))
    tied = TiedEmbeddingGradientSum(named, communicator, head_stage=executor.loss_stage)
    losses = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = executor.run(split_microbatches(inputs, microbatches), split_microbatches(targets, microbatches))
        if sum_tied:
            tied.finish_gradient_sync()
        optimizer.step()
        losses.append(loss)
    return (losses if losses[0] is not None else None), {name: p.data for name, p in named}, executor


def gather_to_rank0(communicator, named_arrays):
    """On rank 0: {full name: [(rank, array), ...]} over every stage; None elsewhere."""
    names = sorted(named_arrays)
    listing = communicator.mpi.gather([(name, named_arrays[name].shape) for name in names], root=0)
    if communicator.rank != 0:
        for name in names:
            communicator.send(xp.ascontiguousarray(named_arrays[name]), 0, tag=1)
        return None
    gathered = {}
    for rank, entries in enumerate(listing):
        for name, shape in entries:
            array = named_arrays[name] if rank == 0 else communicator.recv(xp.empty(shape, xp.float64), rank, tag=1)
            gathered.setdefault(name, []).append((rank, array))
    return gathered


def compare_with_reference(compare, communicator, label, reference, losses, named_arrays, copies_of_tied=1,
                           loss_rank=None):
    """Rank 0 compares every gathered parameter and the last stage's losses with the reference."""
    all_losses = communicator.mpi.gather(losses, root=0)
    gathered = gather_to_rank0(communicator, named_arrays)
    if communicator.rank != 0:
        return
    reference_losses, reference_state = reference
    reporting = [rank for rank, entry in enumerate(all_losses) if entry is not None]
    loss_rank = communicator.size - 1 if loss_rank is None else loss_rank  # 0 under ZB-V's V
    compare.value(f"{label}: ranks reporting losses", reporting, [loss_rank])
    compare.arrays_close(f"{label}: losses", all_losses[reporting[-1]] if reporting else [], reference_losses,
                         rtol=RTOL, atol=ATOL)
    compare.value(f"{label}: parameter names", sorted(gathered), sorted(reference_state))
    for name, copies in gathered.items():
        expected_copies = copies_of_tied if name == TIED_EMBEDDING else 1
        compare.value(f"{label}: copies of {name}", len(copies), expected_copies)
        for rank, array in copies:
            compare.arrays_close(f"{label}: {name} on rank {rank}", array, reference_state[name], rtol=RTOL, atol=ATOL)


def expected_peak_stash(schedule, stages, stage, microbatches, chunks_per_stage):
    """The most (micro-batch, chunk) pairs this executor stashes at once (see docs/pipeline_parallel.md)."""
    if schedule == "gpipe":
        return microbatches
    if schedule in ("zb-h1", "zb-h2", "zbv"):  # held from F until W (docs/pipeline_schedules.md)
        return {"zb-h1": min(stages, microbatches), "zb-h2": min(2 * stages - 1, microbatches),
                "zbv": min(2 * stages, 2 * microbatches)}[schedule]
    if schedule == "1f1b" or chunks_per_stage == 1:
        return min(stages - stage, microbatches)
    warmup = (chunks_per_stage - 1) * stages + 2 * (stages - stage - 1)
    return min(warmup + 1, microbatches * chunks_per_stage)


# ---- the checks -----------------------------------------------------------------------------

def check_timeline(compare, executor, label):
    """STEPS steps recorded: one event per compute and receive action, one after another in time."""
    events = executor.timeline.events
    computes = ("forward", "backward_input", "backward_weight") if executor.schedule_splits_backward else \
        ("forward", "backward")
    count = {category: sum(event.category == category for event in events) for category in computes}
    receives = sum(action.kind in RECEIVES for action in executor.schedule)
    count["recv"] = sum(event.category == "recv" for event in events)
    expected = {category: STEPS * executor.num_microbatches * len(executor.chunks) for category in computes}
    expected["recv"] = STEPS * receives
    compare.value(f"{label}: events in the timeline of rank {executor.stage}", count, expected)
    overlapping = [f"{earlier} and {later}" for earlier, later in pairwise(events) if earlier.end > later.start]
    compare.value(f"{label}: overlapping events on rank {executor.stage}", overlapping[:3], [])


def check_gpt_cases(compare, communicator, cases, n_layer=8):
    """cases: [schedule, micro-batches, chunks per stage, recompute, optional split]."""
    config = gpt_config(n_layer)
    batches = gpt_batches(config)
    reference = None
    if communicator.rank == 0:
        reference = train_single_process(GPT(config), lambda model, ids, targets: model(ids, targets)[1], batches)
    p = communicator.size
    for schedule, microbatches, chunks_per_stage, recompute, *split in cases:
        split = split[0] if split else None
        label = (f"gpt L={n_layer} p={p} {schedule} m={microbatches} v={chunks_per_stage} recompute={recompute}"
                 + (f" split={split}" if split else ""))
        losses, named, executor = train_pipeline(
            communicator, GPT(config).pieces(), batches, schedule, microbatches, chunks_per_stage, recompute,
            activation_tail=(LENGTH, config.n_embd), split=split)
        expected = expected_peak_stash(schedule, p, communicator.rank, microbatches, chunks_per_stage)
        compare.value(f"{label}: peak stash on rank {communicator.rank}", executor.peak_stashed, expected)
        check_timeline(compare, executor, label)
        record_send_buffers(compare, label, executor.comm)
        compare_with_reference(compare, communicator, label, reference, losses, named,
                               copies_of_tied=1 if p == 1 or schedule == "zbv" else 2, loss_rank=executor.loss_stage)


def check_mlp_cases(compare, communicator, cases):
    """The same machinery on a plain MLP. Its Linear layers save their input for dW = x^T dy, so a
    received activation that aliased a reused receive buffer would corrupt these weights (GPipe on
    2 stages with 3 micro-batches overwrites micro-batch 0's input before its backward)."""
    batches = mlp_batches()
    reference = None
    if communicator.rank == 0:
        reference = train_single_process(MLPStack(), lambda model, x, y: model.loss(x, y), batches)
    for schedule, microbatches, chunks_per_stage, recompute in cases:
        label = f"mlp p={communicator.size} {schedule} m={microbatches} v={chunks_per_stage} recompute={recompute}"
        losses, named, executor = train_pipeline(communicator, MLPStack().pieces(), batches, schedule, microbatches,
                                                 chunks_per_stage, recompute, activation_tail=(6,))
        record_send_buffers(compare, label, executor.comm)
        compare_with_reference(compare, communicator, label, reference, losses, named, loss_rank=executor.loss_stage)


def check_tied_embedding_reduction_matters(compare, communicator):
    """Without summing the tied gradients, both copies drift from single-process training."""
    config = gpt_config()
    batches = gpt_batches(config)
    reference = train_single_process(GPT(config), lambda model, ids, targets: model(ids, targets)[1], batches)
    _, named, _ = train_pipeline(communicator, GPT(config).pieces(), batches, "1f1b", 4, sum_tied=False,
                                 activation_tail=(LENGTH, config.n_embd))
    compare.value(f"rank {communicator.rank} holds a copy of the tied weight", TIED_EMBEDDING in named, True)
    if TIED_EMBEDDING in named:
        difference = float(abs(named[TIED_EMBEDDING] - reference[1][TIED_EMBEDDING]).max())
        compare.true(f"the unsummed tied copy drifts (by more than 1e-4) on rank {communicator.rank}",
                     difference > 1e-4, f"it differs by only {difference}")


def check_recompute_replays_dropout(compare, communicator):
    """With dropout on, recomputation draws the same masks again: gradients equal the stashed run's."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=4, n_head=2, n_embd=8, seed=7, dropout=0.3)
    ids, targets = gpt_batches(config)[0]
    gradients = []
    for recompute in (False, True):
        chunks = partition(GPT(config).pieces(), communicator.size, communicator.rank, num_chunks=2)
        executor = PipelineExecutor(chunks, communicator, "interleaved", 2 * communicator.size,
                                    (BATCH // (2 * communicator.size), LENGTH, 8), xp.float64, recompute=recompute)
        for _ in range(2):  # the second step starts from generators the first step advanced
            executor.run(split_microbatches(ids, executor.num_microbatches),
                         split_microbatches(targets, executor.num_microbatches))
        gradients.append({name: p.grad for name, p in stage_parameters(chunks)})
    compare.value(f"parameter names with and without recomputation on rank {communicator.rank}",
                  sorted(gradients[1]), sorted(gradients[0]))
    for name, stashed in gradients[0].items():
        compare.arrays_equal(f"recompute with dropout: gradient of {name}", gradients[1][name], stashed)


def check_config_errors(compare, communicator):
    """Bad input raises a ConfigError naming its numbers on every rank, before any message moves."""
    pieces, p, rank = GPT(gpt_config()).pieces(), communicator.size, communicator.rank
    shape = (2, LENGTH, 8)
    bad_calls = {
        "more chunks than layers": lambda: partition(pieces, p, rank, num_chunks=8 // p + 1),
        "split not summing to the layers": lambda: partition(pieces, p, rank, split=[1] * (p - 1) + [10 - p]),
        "split of the wrong length": lambda: partition(pieces, p, rank, split=[8]),
        "microbatches < 1": lambda: PipelineExecutor(partition(pieces, p, rank), communicator, "1f1b", 0,
                                                     shape, xp.float64),
        "microbatches not dividing the batch": lambda: split_microbatches(xp.zeros((BATCH, LENGTH)), 5),
    }
    if p == 1:
        bad_calls["split with a zero"] = lambda: partition(pieces, 1, 0, num_chunks=2, split=[0, 8])
        del bad_calls["split of the wrong length"]  # [8] is right for one stage
    else:
        bad_calls["split with a zero"] = lambda: partition(pieces, p, rank, split=[0] + [1] * (p - 2) + [10 - p])
    if 3 * p <= 8:
        bad_calls["interleaving that does not fit the layers"] = lambda: partition(pieces, p, rank, num_chunks=3)
    if 2 * p <= 8:
        two_chunks = partition(pieces, p, rank, num_chunks=2)
        bad_calls["gpipe with two chunks"] = lambda: PipelineExecutor(two_chunks, communicator, "gpipe", 2 * p,
                                                                      shape, xp.float64)
        if p > 1:
            bad_calls["interleaving with m not a multiple of p"] = lambda: PipelineExecutor(
                two_chunks, communicator, "interleaved", p + 1, shape, xp.float64)
    for what, call in bad_calls.items():
        try:
            call()
        except ConfigError as error:
            message = str(error)
        else:
            message = None
        compare.value(f"{what}: (refused with a ConfigError, its message names a number)",
                      [message is not None, message is not None and any(c.isdigit() for c in message)], [True, True])


def run_checks(comm, gpt_cases=(), mlp_cases=(), deep_gpt_cases=(), tied=False, errors=False):
    """Everything for one world size in one launch (an mpiexec start costs seconds on two cores).

    Returns the comparisons for pytest; ``checks`` names each case that ran.
    """
    set_default_dtype(xp.float64)
    communicator, compare = Communicator(comm), Comparisons()
    for n_layer, cases in ((8, gpt_cases), (16, deep_gpt_cases)):
        if cases:
            check_gpt_cases(compare, communicator, cases, n_layer)
            compare.checks += [f"gpt L={n_layer} {case}" for case in cases]
    check_mlp_cases(compare, communicator, mlp_cases)
    compare.checks += [f"mlp {case}" for case in mlp_cases]
    if tied:
        check_tied_embedding_reduction_matters(compare, communicator)
        check_recompute_replays_dropout(compare, communicator)
        compare.checks += ["tied embedding", "recompute with dropout"]
    if errors:
        check_config_errors(compare, communicator)
        compare.checks.append("config errors")
    return compare.report()
