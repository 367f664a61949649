"""The autograd engine's fixed cost: time a long chain of tiny ops, report µs per op and per node.

    python benchmarks/bench_engine.py [--layers 500] [--width 4] [--repeats 30] [--json FILE]

The chain is h <- tanh(h * w_i + b_i) for i = 1..L on arrays of ``width`` elements, with every
w_i and b_i a leaf that wants a gradient: 3 ops (mul, add, tanh), so 3 autograd nodes, per layer.
On arrays this small NumPy's own work is a fraction of a microsecond per call, so what is timed
is the engine: building a Tensor and a node per op (forward) and visiting the nodes, calling
each backward and accumulating leaf gradients (backward).

Printed, the best of ``repeats`` runs in this thread's CPU time (the machine may be shared: time
spent descheduled does not count, and the fastest run is the one least disturbed by others):
  forward   µs per op call while recording the graph (and under no_grad, for comparison)
  backward  µs per node
  step      (forward + backward) µs per node, and the same maths in plain NumPy with a
            hand-written backward, so "engine overhead per node" = step - NumPy.

To compare two versions of the engine: benchmarks/compare_trees.py runs this file with each on
PYTHONPATH, interleaved, reading the figures that ``--json FILE`` writes.
"""
import argparse
import json
import os
import sys
import time

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # PYTHONPATH, if set, picks the engine
import numpy as np  # noqa: E402

from minipar.tensor import Tensor, no_grad  # noqa: E402

OPS_PER_LAYER = 3
# CPU time of this thread: on a shared machine, time spent descheduled does not count.
CLOCK = time.thread_time


def make_leaves(layers, width, seed=0):
    generator = np.random.default_rng(seed)
    x = generator.normal(size=width)
    weights = [generator.normal(size=width) for _ in range(layers)]
    biases = [generator.normal(size=width) for _ in range(layers)]
    return x, weights, biases


def engine_forward(x, weights, biases):
    h = x
    for w, b in zip(weights, biases, strict=True):
        h = (h * w + b).tanh()
    return h.sum()


def numpy_step(x, weights, biases):
    """The same chain with a hand-written backward: the floor the engine is measured against."""
    h, outputs = x, []
    for w, b in zip(weights, biases, strict=True):
        h = np.tanh(h * w + b)
        outputs.append(h)
    grad = np.ones_like(h)
    grads_w, grads_b = [None] * len(weights), [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        grad = grad * (1 - outputs[i] * outputs[i])
        grads_b[i] = grad.copy()
        inputs = outputs[i - 1] if i else x
        grads_w[i] = grad * inputs
        grad = grad * weights[i]
    return grads_w, grads_b


def best_us(function, repeats):
    times = []
    for _ in range(repeats):
        started = CLOCK()
        function()
        times.append(CLOCK() - started)
    return 1e6 * min(times)


def measure(layers, width, repeats):
    x, w_arrays, b_arrays = make_leaves(layers, width)
    x = Tensor(x, requires_grad=True)
    weights = [Tensor(w, requires_grad=True) for w in w_arrays]
    biases = [Tensor(b, requires_grad=True) for b in b_arrays]
    nodes = OPS_PER_LAYER * layers + 1  # + the final sum

    forward_times, backward_times = [], []
    for _ in range(repeats):
        started = CLOCK()
        loss = engine_forward(x, weights, biases)
        middle = CLOCK()
        loss.backward()
        forward_times.append(middle - started)
        backward_times.append(CLOCK() - middle)
    forward_us, backward_us = 1e6 * min(forward_times), 1e6 * min(backward_times)

    def forward_no_grad():
        with no_grad():
            engine_forward(x, weights, biases)

    no_grad_us = best_us(forward_no_grad, repeats)
    numpy_us = best_us(lambda: numpy_step(x.data, w_arrays, b_arrays), repeats)
    return {"forward_per_op": forward_us / nodes, "no_grad_per_op": no_grad_us / nodes,
            "backward_per_node": backward_us / nodes, "step_per_node": (forward_us + backward_us) / nodes,
            "numpy_per_node": numpy_us / nodes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None, help="also write the figures (µs) to this file")
    arguments = parser.parse_args()
    result = measure(arguments.layers, arguments.width, arguments.repeats)
    print(f"engine: {os.path.dirname(sys.modules['minipar.tensor'].__file__)}")
    print(f"chain of {arguments.layers} layers x {OPS_PER_LAYER} ops on arrays of {arguments.width}, "
          f"best of {arguments.repeats} runs")
    print(f"  forward (recording)   {result['forward_per_op']:7.2f} µs per op call")
    print(f"  forward (no_grad)     {result['no_grad_per_op']:7.2f} µs per op call")
    print(f"  backward              {result['backward_per_node']:7.2f} µs per node")
    print(f"  forward + backward    {result['step_per_node']:7.2f} µs per node")
    print(f"  NumPy, hand backward  {result['numpy_per_node']:7.2f} µs per node")
    print(f"  engine overhead       {result['step_per_node'] - result['numpy_per_node']:7.2f} µs per node")
    if arguments.json:
        figures = {"engine forward µs/op": result["forward_per_op"], "engine backward µs/node": result["backward_per_node"],
                   "engine overhead µs/node": result["step_per_node"] - result["numpy_per_node"]}
        with open(arguments.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
