"""A 7-layer MLP whose widths change at every layer, trained under pipeline parallelism.

Run on every rank by tests/test_pipeline_mlp.py. Widths 784, 128, 127, 126, 125, 124, 123, 10
with ReLU and a cross-entropy head: no two boundaries between stages carry the same shape, so
the executor gets one activation shape per boundary. Each case trains STEPS SGD steps in float64
with p = world size stages; rank 0 gathers the parameters by name and writes, for pytest to
compare, the single-process run's losses and parameters next to the pipeline's (an .npz file,
no pickle). The body itself asserts nothing about the numbers.
"""
from itertools import pairwise

import numpy as np

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


def gather_parameters(communicator, named):
    """On rank 0: [(rank, name, array)] for every stage's parameters (names pickled, arrays by Send/Recv)."""
    names = sorted(named)
    listing = communicator.mpi.gather([(name, named[name].shape) for name in names], root=0)
    if communicator.rank != 0:
        for name in names:
            communicator.send(xp.ascontiguousarray(named[name]), 0, tag=1)
        return None
    return [(rank, name, named[name] if rank == 0 else communicator.recv(xp.empty(shape, xp.float64), rank, tag=1))
            for rank, entries in enumerate(listing) for name, shape in entries]


def run_cases(comm, cases, output_path):
    """cases: [[schedule, micro-batches], ...]; rank 0 writes expected and got arrays to output_path."""
    from minipar.backend import set_default_dtype

    set_default_dtype(xp.float64)
    communicator = Communicator(comm)
    results = {}
    if comm.rank == 0:
        expected_losses, expected = train_single_process()
        results["expected/losses"] = np.array(expected_losses)
        for name, array in expected.items():
            results[f"expected/{name}"] = array
    for schedule, microbatches in cases:
        losses, named = train_pipeline(communicator, schedule, microbatches)
        label = f"{schedule}-m{microbatches}"
        all_losses = comm.gather(losses, root=0)  # a few floats per rank
        gathered = gather_parameters(communicator, named)
        if comm.rank == 0:
            (got_losses,) = [entry for entry in all_losses if entry[0] is not None]
            results[f"{label}/losses"] = np.array(got_losses)
            for rank, name, array in gathered:
                results[f"{label}/{name}@{rank}"] = to_host(array)
    if comm.rank == 0:
        np.savez(output_path, **results)
