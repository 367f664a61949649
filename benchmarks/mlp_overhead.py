"""What bounds bench_mlp.py's sequential ratio: the MLP's array work against the per-call cost around it.

    python benchmarks/mlp_overhead.py [--rounds 15] [--steps 10] [--profile FILE]

One process, bench_mlp.py's model and step (4 micro-batches, SGD), minipar and the peer taking turns
in each round, at bench_mlp's widths (784 … 10) and again at widths of 2 with the same number of
rows. At width 2 NumPy's work is almost nothing, so what is left is each implementation's fixed cost
per step: the Python around every NumPy call and, for minipar, the engine (Tensors, nodes, the
backward walk, hooks) and the modules. Printed: the median ms per step of each, and
    array work     ≈ peer at full width − peer at width 2
    minipar's extra fixed cost = minipar at width 2 − peer at width 2
which, with the array work the same maths, predicts minipar / peer at full width.

``--profile FILE`` also writes a cProfile (CPU clock) of minipar's steps at width 2, to read with
``python -m pstats FILE`` (``sort tottime``, ``stats 25``).
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, ".."))  # PYTHONPATH, if set, picks the minipar
sys.path.append(HERE)

import bench_mlp  # noqa: E402
import numpy as np  # noqa: E402


def step_functions(widths):
    """(minipar's step, the peer's step, micro-batch inputs, targets) for an MLP of ``widths``."""
    bench_mlp.WIDTHS = widths  # the pieces read the module's widths
    weights, biases = bench_mlp.initial_weights(np.float32)
    generator = np.random.default_rng(1)
    inputs = generator.normal(size=(bench_mlp.BATCH, widths[0])).astype(np.float32)
    targets = generator.integers(0, widths[-1], bench_mlp.BATCH)
    size = bench_mlp.BATCH // bench_mlp.MICROBATCHES
    micro_inputs = [inputs[i * size:(i + 1) * size] for i in range(bench_mlp.MICROBATCHES)]
    micro_targets = [targets[i * size:(i + 1) * size] for i in range(bench_mlp.MICROBATCHES)]
    minipar = bench_mlp.minipar_step_function("sequential", None, weights, biases)
    peer = bench_mlp.peer_step_function("sequential", None, weights, biases)
    return minipar, peer, micro_inputs, micro_targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", default=None, help="write a cProfile of minipar at width 2 here")
    arguments = parser.parse_args()
    full = bench_mlp.WIDTHS
    cases = {}
    for label, widths in (("full", full), ("width 2", (2,) * len(full))):
        minipar, peer, xs, ts = step_functions(widths)
        cases[f"minipar, {label}"] = (minipar, xs, ts)
        cases[f"peer, {label}"] = (peer, xs, ts)
    times = {name: [] for name in cases}
    for round_ in range(arguments.rounds + 1):  # round 0 warms up
        for name, (step, xs, ts) in cases.items():
            started = time.process_time()
            for _ in range(arguments.steps):
                step(xs, ts)
            if round_:
                times[name].append(1e3 * (time.process_time() - started) / arguments.steps)
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    print(f"MLP {'-'.join(map(str, full))} and the same at width 2, batch {bench_mlp.BATCH} in "
          f"{bench_mlp.MICROBATCHES} micro-batches; CPU ms per step, median of {arguments.rounds} rounds")
    for name, value in median.items():
        print(f"  {name:18s} {value:7.3f} ms")
    work = median["peer, full"] - median["peer, width 2"]
    extra = median["minipar, width 2"] - median["peer, width 2"]
    print(f"  array work (peer full - peer width 2)            {work:7.3f} ms")
    print(f"  minipar's extra fixed cost (minipar - peer, width 2) {extra:7.3f} ms")
    print(f"  minipar / peer at full width: measured {median['minipar, full'] / median['peer, full']:.2f}, "
          f"with no extra fixed cost it would be {(median['minipar, full'] - extra) / median['peer, full']:.2f}")
    if arguments.profile:
        import cProfile

        step, xs, ts = cases["minipar, width 2"]
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        for _ in range(arguments.rounds * arguments.steps):
            step(xs, ts)
        profiler.disable()
        profiler.dump_stats(arguments.profile)
        print(f"  cProfile of {arguments.rounds * arguments.steps} minipar steps at width 2: {arguments.profile}")


if __name__ == "__main__":
    main()
