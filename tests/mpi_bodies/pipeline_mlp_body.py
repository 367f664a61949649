"""A 7-layer MLP whose widths change at every layer, trained under pipeline parallelism.

Run on every rank by tests/test_pipeline_mlp.py. Widths 784, 128, 127, 126, 125, 124, 123, 10
with ReLU and a cross-entropy head: no two boundaries between stages carry the same shape, so
the executor gets one activation shape per boundary. Each case trains STEPS SGD steps in float64
with p = world size stages. Every rank also runs the single-process reference (it is small) and
records, for pytest to judge, how its stage's parameters and the last stage's losses compare with
it; rank 0 also records that the stages together hold every parameter exactly once.
"""
from itertools import pairwise

from minipar import ops
from minipar.backend import from_host, host_rng, to_host, xp
from minipar.comm import Communicator
from minipar.nn.layers import Linear
from minipar.nn.module import Module
from minipar.optim import SGD
from minipar.parallel.pipeline.executor import PipelineExecutor, split_microbatches
from minipar.parallel.pipeline.partition import chunk_piece_ranges, partition, stage_parameters
from minipar.parallel.sharding import label_replicated

WIDTHS = (784, 128, 127, 126, 125, 124, 123, 10)
STEPS = 2
BATCH = 32
RTOL, ATOL = 1e-10, 1e-12


class ReluLayer(Module):
    def __init__(self, width_in, width_out, generator):
        self.linear = Linear(width_in, width_out)
        self.linear.weight.data[...] = from_host(generator.normal(0, (2 / width_in) ** 0.5, (width_in, width_out)))
        self.linear.bias.data[...] = from_host(generator.normal(0, 0.1, width_out))

    def forward(self, x):
        return ops.relu(self.linear(x))


class CrossEntropyHead(Module):
    def __init__(self, width_in, classes, generator):
        self.linear = Linear(width_in, classes)
        self.linear.weight.data[...] = from_host(generator.normal(0, width_in ** -0.5, (width_in, classes)))
        self.linear.bias.data[...] = from_host(generator.normal(0, 0.1, classes))

    def forward(self, x, targets):
        return ops.cross_entropy(self.linear(x), targets)


class MLP(Module):
    """[ReLU layer 784->128, five ReLU layers, cross-entropy head 123->10] as pipeline pieces."""

    def __init__(self, seed=5):
        generator = host_rng(seed)
        pairs = list(pairwise(WIDTHS))
        self.layers = [ReluLayer(a, b, generator) for a, b in pairs[:-1]] + [CrossEntropyHead(*pairs[-1], generator)]
        label_replicated(self)

    def pieces(self):
        return list(self.layers)

    def loss(self, x, targets):
        for layer in self.layers[:-1]:
            x = layer(x)
        return self.layers[-1](x, targets)


def batches():
    generator = host_rng(17)
    return [(from_host(generator.normal(size=(BATCH, WIDTHS[0]))), from_host(generator.integers(0, WIDTHS[-1], BATCH)))
            for _ in range(STEPS)]


def boundary_shapes(stages, microbatches):
    """(b, width) after every chunk but the last: the widths differ at every boundary."""
    ranges = chunk_piece_ranges(len(WIDTHS) - 1, stages)
    return [(BATCH // microbatches, WIDTHS[stop]) for _, stop in ranges[:-1]]


def train_single_process():
    model = MLP()
    optimizer = SGD(model.parameters(), lr=0.1)
    losses = []
    for inputs, targets in batches():
        optimizer.zero_grad()
        loss = model.loss(inputs, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {p.shard.full_name: to_host(p.data) for p in model.parameters()}


def train_pipeline(communicator, schedule, microbatches):
    chunks = partition(MLP().pieces(), communicator.size, communicator.rank)
    named = stage_parameters(chunks)
    optimizer = SGD([p for _, p in named], lr=0.1)
    executor = PipelineExecutor(chunks, communicator, schedule, microbatches,
                                boundary_shapes(communicator.size, microbatches), xp.float64)
    losses = []
    for inputs, targets in batches():
        optimizer.zero_grad()
        losses.append(executor.run(split_microbatches(inputs, microbatches), split_microbatches(targets, microbatches)))
        optimizer.step()
    return losses, {name: p.data for name, p in named}


def run_cases(comm, cases):
    """cases: [[schedule, micro-batches], ...]; returns this rank's comparisons with one process."""
    from minipar.backend import set_default_dtype
    from tests.mpi_bodies.comparisons import Comparisons

    set_default_dtype(xp.float64)
    communicator, comparisons = Communicator(comm), Comparisons()
    expected_losses, expected = train_single_process()
    for schedule, microbatches in cases:
        label = f"p={comm.size} {schedule} m={microbatches}"
        comparisons.checks.append(label)
        losses, named = train_pipeline(communicator, schedule, microbatches)
        if losses[0] is not None:  # the last stage
            comparisons.arrays_close(f"{label}: losses", losses, expected_losses, RTOL, ATOL)
        for name, array in sorted(named.items()):
            comparisons.arrays_close(f"{label}: {name}", array, expected[name], RTOL, ATOL)
        held = comm.gather(sorted(named), root=0)  # names only: small metadata
        if comm.rank == 0:
            comparisons.value(f"{label}: parameters held by the stages", sorted(sum(held, [])), sorted(expected))
    return comparisons.report()
