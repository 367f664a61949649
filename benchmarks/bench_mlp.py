"""A 7-layer MLP in minipar against a NumPy + mpi4py peer with hand-written backward passes.

    python benchmarks/bench_mlp.py [--rounds 7] [--steps 10] [--configs sequential,dp2,...] [--json FILE]

The model of issue 16: widths 784, 128, 127, 126, 125, 124, 123, 10, ReLU, mean softmax
cross-entropy, SGD; a global batch of 128 rows in 4 micro-batches (gradients accumulate, each
micro-batch loss scaled by 1/4). Configurations, each one ``mpiexec`` job:
  sequential   1 rank
  dp2, dp4     data parallel: 128/N rows per rank, in 4 micro-batches; minipar's DataParallel
               blocking and with --overlap, the peer's one in-place Allreduce
  gpipe2/4, 1f1b2/4  pipeline parallel, one stage per rank, 4 micro-batches of 32 rows
The peer (benchmarks/mlp_peer.py) does the same maths and starts from the same weights. Inside
a job the implementations take turns, ``steps`` steps each, for ``rounds`` rounds; a block's time
is the slowest rank's. Printed: median ms per step and the median of the per-round ratios
minipar / peer. Ratios taken in turn inside one job are meaningful on a shared machine even when
the milliseconds are not. ``--json FILE`` also writes the ratios there, {"MLP <config> minipar/peer": r, ...}
(benchmarks/compare_trees.py reads it).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from itertools import pairwise

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, ".."))
sys.path.append(HERE)

WIDTHS = (784, 128, 127, 126, 125, 124, 123, 10)
BATCH, MICROBATCHES, LR = 128, 4, 0.05
CONFIGS = {"sequential": ("sequential", 1), "dp2": ("dp", 2), "dp4": ("dp", 4), "gpipe2": ("gpipe", 2),
           "1f1b2": ("1f1b", 2), "gpipe4": ("gpipe", 4), "1f1b4": ("1f1b", 4)}


# ---- the rank side --------------------------------------------------------------------------------

def initial_weights(dtype):
    generator = __import__("numpy").random.default_rng(0)
    pairs = list(pairwise(WIDTHS))
    weights = [generator.normal(0, (2 / a) ** 0.5, (a, b)).astype(dtype) for a, b in pairs]
    biases = [generator.normal(0, 0.01, b).astype(dtype) for _, b in pairs]
    return weights, biases


def minipar_pieces(weights, biases):
    """[ReLU layers..., head with its loss]: the MLP as a chain of minipar modules."""
    from minipar import ops
    from minipar.nn.layers import Linear
    from minipar.nn.module import Module

    class ReluLayer(Module):
        def __init__(self, w, b):
            self.linear = Linear(*w.shape)
            self.linear.weight.data[...], self.linear.bias.data[...] = w, b

        def forward(self, x):
            return ops.relu(self.linear(x))

    class Head(Module):
        def __init__(self, w, b):
            self.linear = Linear(*w.shape)
            self.linear.weight.data[...], self.linear.bias.data[...] = w, b

        def forward(self, x, targets):
            return ops.cross_entropy(self.linear(x), targets)

    return [ReluLayer(w, b) for w, b in zip(weights[:-1], biases[:-1], strict=True)] + [Head(weights[-1], biases[-1])]


def minipar_step_function(kind, comm, weights, biases, overlap=False):
    from minipar.comm import Communicator
    from minipar.optim import SGD
    from minipar.parallel.pipeline.executor import PipelineExecutor
    from minipar.parallel.pipeline.partition import (
        chunk_piece_ranges,
        partition,
        stage_parameters,
    )

    pieces = minipar_pieces(weights, biases)
    if kind in ("sequential", "dp"):
        parameters = [p for piece in pieces for p in piece.parameters()]
        optimizer = SGD(parameters, lr=LR)
        data_parallel = None
        if kind == "dp":
            from minipar.parallel.data_parallel import DataParallel

            data_parallel = DataParallel(parameters, Communicator(comm), overlap=overlap,
                                         accumulation_steps=MICROBATCHES)
        # Gradients that are views of the buckets are zeroed by start_step; a tree from before them
        # (compare_trees.py runs this script on older commits) copies into its buckets and zeroes .grad.
        bucket_views = hasattr(data_parallel, "start_step")

        def step(micro_inputs, micro_targets):
            if bucket_views:
                data_parallel.start_step()  # zero the buckets: backward accumulates into them in place
            for x, t in zip(micro_inputs, micro_targets, strict=True):
                for piece in pieces[:-1]:
                    x = piece(x)
                (pieces[-1](x, t) * (1.0 / MICROBATCHES)).backward()
            if data_parallel is not None:
                data_parallel.finish_gradient_sync()
            optimizer.step()
            if not bucket_views:
                optimizer.zero_grad()
        return step

    chunks = partition(pieces, comm.size, comm.rank)
    optimizer = SGD([p for _, p in stage_parameters(chunks)], lr=LR)
    ranges = chunk_piece_ranges(len(pieces), comm.size)
    shapes = [(BATCH // MICROBATCHES, WIDTHS[stop]) for _, stop in ranges[:-1]]
    executor = PipelineExecutor(chunks, Communicator(comm), kind, MICROBATCHES, shapes, weights[0].dtype)

    def step(micro_inputs, micro_targets):
        executor.run(micro_inputs, micro_targets)
        optimizer.step()
        optimizer.zero_grad()
    return step


def peer_step_function(kind, comm, weights, biases):
    from mlp_peer import PeerMLP, PeerPipeline, sequential_step

    from minipar.parallel.pipeline.partition import chunk_piece_ranges

    if kind in ("sequential", "dp"):
        model = PeerMLP(WIDTHS, weights, biases)
        return lambda micro_inputs, micro_targets: sequential_step(model, micro_inputs, micro_targets, LR,
                                                                   comm if kind == "dp" else None)
    first, last = chunk_piece_ranges(len(WIDTHS) - 1, comm.size)[comm.rank]
    ranges = chunk_piece_ranges(len(WIDTHS) - 1, comm.size)
    shapes = [(BATCH // MICROBATCHES, WIDTHS[stop]) for _, stop in ranges[:-1]]
    pipeline = PeerPipeline(PeerMLP(WIDTHS, weights, biases, first, last), comm, kind, MICROBATCHES, shapes,
                            weights[0].dtype)
    return lambda micro_inputs, micro_targets: pipeline.step(micro_inputs, micro_targets, LR)


def worker(config, rounds, steps):
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    kind, _ = CONFIGS[config]
    dtype = np.float32
    weights, biases = initial_weights(dtype)
    generator = np.random.default_rng(1)
    inputs = generator.normal(size=(BATCH, WIDTHS[0])).astype(dtype)
    targets = generator.integers(0, WIDTHS[-1], BATCH)
    if kind == "dp":  # this rank's rows of the global batch
        mine = slice(comm.rank * BATCH // comm.size, (comm.rank + 1) * BATCH // comm.size)
        inputs, targets = inputs[mine], targets[mine]
    size = len(inputs) // MICROBATCHES
    micro_inputs = [inputs[i * size:(i + 1) * size] for i in range(MICROBATCHES)]
    micro_targets = [targets[i * size:(i + 1) * size] for i in range(MICROBATCHES)]
    implementations = {"minipar": minipar_step_function(kind, comm, weights, biases)}
    if kind == "dp":
        implementations["minipar overlap"] = minipar_step_function(kind, comm, weights, biases, overlap=True)
    implementations["peer"] = peer_step_function(kind, comm, weights, biases)
    times = {name: [] for name in implementations}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, step in implementations.items():
            comm.Barrier()
            started = time.perf_counter()
            for _ in range(steps):
                step(micro_inputs, micro_targets)
            elapsed = comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
            if round_:
                times[name].append(1e3 * elapsed / steps)
    if comm.rank == 0:
        print("RESULT " + json.dumps(times), flush=True)


# ---- the driver -------------------------------------------------------------------------------

def run_config(config, rounds, steps):
    from minipar.testing import find_mpiexec

    ranks = CONFIGS[config][1]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), os.path.join(HERE, "..")]))
    result = subprocess.run([find_mpiexec(), "-n", str(ranks), sys.executable, __file__, "--worker", config,
                             "--rounds", str(rounds), "--steps", str(steps)],
                            env=environment, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        sys.exit(f"{config} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", default=None, help="also write the ratios to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        return worker(arguments.worker, arguments.rounds, arguments.steps)
    print(f"MLP {'-'.join(map(str, WIDTHS))}, batch {BATCH} in {MICROBATCHES} micro-batches, SGD, float32; "
          f"{os.cpu_count()} cores; median of {arguments.rounds} rounds x {arguments.steps} steps")
    print(f"{'config':12s} {'minipar ms':>11s} {'overlap ms':>11s} {'peer ms':>9s} {'minipar/peer':>13s} "
          f"{'overlap/peer':>13s}")
    figures = {}
    for config in arguments.configs.split(","):
        times = run_config(config, arguments.rounds, arguments.steps)
        ratio = median([a / b for a, b in zip(times["minipar"], times["peer"], strict=True)])
        figures[f"MLP {config} minipar/peer"] = ratio
        overlap = times.get("minipar overlap")
        if overlap:
            figures[f"MLP {config} overlap/peer"] = median([a / b for a, b in zip(overlap, times["peer"], strict=True)])
        overlap_ms = f"{median(overlap):11.2f}" if overlap else f"{'':11s}"
        overlap_ratio = f"{figures[f'MLP {config} overlap/peer']:12.2f}x" if overlap else f"{'':13s}"
        print(f"{config:12s} {median(times['minipar']):11.2f} {overlap_ms} {median(times['peer']):9.2f} "
              f"{ratio:12.2f}x {overlap_ratio}", flush=True)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
