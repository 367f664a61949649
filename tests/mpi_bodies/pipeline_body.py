"""Pipeline-parallel training checked against one process, run on every rank by tests/test_pipeline.py.

Each case trains for STEPS AdamW steps in float64 with p = world size stages, then rank 0 gathers
every stage's parameters by their single-process name (``shard.full_name``; names as pickled
metadata, arrays with Send/Recv) and compares them, and the step losses, with single-process
training on the same global batches. The reference is one step on the whole batch, so it does not
depend on the number of micro-batches: it is computed once per model and reused by every case.
"""
from minipar.backend import from_host, host_rng, set_default_dtype, xp
from minipar.comm import Communicator
from minipar.errors import ConfigError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.nn.layers import Linear
from minipar.nn.module import Module
from minipar.optim import AdamW
from minipar.parallel.pipeline.executor import PipelineExecutor, split_microbatches
from minipar.parallel.pipeline.partition import (
    TIED_EMBEDDING, TiedEmbeddingGradientSum, partition, stage_parameters)
from minipar.parallel.pipeline.schedules import RECEIVES
from minipar.parallel.sharding import label_replicated
from minipar.trace import Timeline

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
    return losses, {p.shard.full_name: p.data.copy() for p in model.parameters()}


def train_pipeline(communicator, pieces, batches, schedule, microbatches, chunks_per_stage=1,
                   recompute=False, activation_tail=(), sum_tied=True, split=None):
    """Train the stage's chunks; returns (losses or None, {full name: array}, executor)."""
    chunks = partition(pieces, communicator.size, communicator.rank, chunks_per_stage, split)
    named = stage_parameters(chunks)
    optimizer = AdamW([p for _, p in named], lr=0.02, weight_decay=0.1)
    activation_shape = (BATCH // microbatches, *activation_tail)
    executor = PipelineExecutor(chunks, communicator, schedule, microbatches, activation_shape, xp.float64,
                                recompute=recompute, timeline=Timeline(communicator.rank))
    tied = TiedEmbeddingGradientSum(named, communicator)
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


def compare_with_reference(communicator, label, reference, losses, named_arrays, copies_of_tied=1):
    """Rank 0 checks every gathered parameter and the last stage's losses against the reference."""
    all_losses = communicator.mpi.gather(losses, root=0)
    gathered = gather_to_rank0(communicator, named_arrays)
    if communicator.rank != 0:
        return
    reference_losses, reference_state = reference
    (pipeline_losses,) = [entry for entry in all_losses if entry is not None]
    xp.testing.assert_allclose(pipeline_losses, reference_losses, rtol=RTOL, atol=ATOL, err_msg=f"{label}: losses")
    assert sorted(gathered) == sorted(reference_state), f"{label}: names {sorted(gathered)}"
    worst = 0.0
    for name, copies in gathered.items():
        expected_copies = copies_of_tied if name == TIED_EMBEDDING else 1
        assert len(copies) == expected_copies, f"{label}: {name} held by ranks {[r for r, _ in copies]}"
        for rank, array in copies:
            xp.testing.assert_allclose(array, reference_state[name], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{label}: {name} on rank {rank}")
            worst = max(worst, float(abs(array - reference_state[name]).max()))
    print(f"ok {label}: max parameter difference {worst:.1e}", flush=True)


def expected_peak_stash(schedule, stages, stage, microbatches, chunks_per_stage):
    """The most (micro-batch, chunk) pairs this executor stashes at once (see docs/pipeline_parallel.md)."""
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b" or chunks_per_stage == 1:
        return min(stages - stage, microbatches)
    warmup = (chunks_per_stage - 1) * stages + 2 * (stages - stage - 1)
    return min(warmup + 1, microbatches * chunks_per_stage)


# ---- the checks -----------------------------------------------------------------------------

def check_timeline(executor, label):
    """STEPS steps recorded: one event per compute and receive action, one after another in time."""
    events = executor.timeline.events
    count = {category: sum(event.category == category for event in events) for category in ("forward", "backward")}
    receives = sum(action.kind in RECEIVES for action in executor.schedule)
    count["recv"] = sum(event.category == "recv" for event in events)
    expected = {"forward": STEPS * executor.num_microbatches * len(executor.chunks),
                "backward": STEPS * executor.num_microbatches * len(executor.chunks), "recv": STEPS * receives}
    assert count == expected, f"{label}: timeline of rank {executor.stage} counts {count}, expected {expected}"
    for earlier, later in zip(events, events[1:]):
        assert earlier.end <= later.start, f"{label}: {earlier} overlaps {later}"


def check_gpt_cases(communicator, cases, n_layer=8):
    """cases: [schedule, micro-batches, chunks per stage, recompute, optional split]; returns how many ran."""
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
        assert executor.peak_stashed == expected, \
            f"{label}: rank {communicator.rank} stashed {executor.peak_stashed} at peak, expected {expected}"
        check_timeline(executor, label)
        compare_with_reference(communicator, label, reference, losses, named, copies_of_tied=1 if p == 1 else 2)
    return len(cases)


def check_mlp_cases(communicator, cases):
    """The same machinery on a plain MLP. Its Linear layers save their input for dW = x^T dy, so a
    received activation that aliased a reused receive buffer would corrupt these weights (GPipe on
    2 stages with 3 micro-batches overwrites micro-batch 0's input before its backward)."""
    batches = mlp_batches()
    reference = None
    if communicator.rank == 0:
        reference = train_single_process(MLPStack(), lambda model, x, y: model.loss(x, y), batches)
    for schedule, microbatches, chunks_per_stage, recompute in cases:
        label = f"mlp p={communicator.size} {schedule} m={microbatches} v={chunks_per_stage} recompute={recompute}"
        losses, named, _ = train_pipeline(communicator, MLPStack().pieces(), batches, schedule, microbatches,
                                          chunks_per_stage, recompute, activation_tail=(6,))
        compare_with_reference(communicator, label, reference, losses, named)
    return len(cases)


def check_tied_embedding_reduction_matters(communicator):
    """Without summing the tied gradients, both copies drift from single-process training."""
    config = gpt_config()
    batches = gpt_batches(config)
    reference = train_single_process(GPT(config), lambda model, ids, targets: model(ids, targets)[1], batches)
    _, named, _ = train_pipeline(communicator, GPT(config).pieces(), batches, "1f1b", 4, sum_tied=False,
                                 activation_tail=(LENGTH, config.n_embd))
    if TIED_EMBEDDING in named:
        difference = float(abs(named[TIED_EMBEDDING] - reference[1][TIED_EMBEDDING]).max())
        assert difference > 1e-4, f"rank {communicator.rank}: the unsummed tied copy differs by only {difference}"
        print(f"ok tied embedding: unsummed copy on rank {communicator.rank} is off by {difference:.1e}", flush=True)
    return 1


def check_recompute_replays_dropout(communicator):
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
    for name, stashed in gradients[0].items():
        assert xp.array_equal(stashed, gradients[1][name]), f"rank {communicator.rank}: {name} differs"
    print(f"ok recompute with dropout on rank {communicator.rank}", flush=True)
    return 1


def check_config_errors(communicator):
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
            raise AssertionError(f"rank {rank}: {what} was accepted")
        assert any(character.isdigit() for character in message), f"{what}: the message names no number: {message}"
    print(f"ok config errors on rank {rank}: {len(bad_calls)} bad inputs refused", flush=True)
    return len(bad_calls)


def run_checks(comm, gpt_cases=(), mlp_cases=(), deep_gpt_cases=(), tied=False, errors=False):
    """Everything for one world size in one launch (an mpiexec start costs seconds on two cores)."""
    set_default_dtype(xp.float64)
    communicator = Communicator(comm)
    counts = [check_gpt_cases(communicator, gpt_cases)]
    if deep_gpt_cases:
        counts.append(check_gpt_cases(communicator, deep_gpt_cases, n_layer=16))
    counts.append(check_mlp_cases(communicator, mlp_cases))
    if tied:
        counts.append(check_tied_embedding_reduction_matters(communicator))
        counts.append(check_recompute_replays_dropout(communicator))
    if errors:
        counts.append(check_config_errors(communicator))
    communicator.barrier()
    if communicator.rank == 0:
        print(f"pipeline checks passed on {communicator.size} ranks: {sum(counts)}", flush=True)
