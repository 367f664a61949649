"""Time one training step (forward, backward, AdamW) of a fixed small GPT.

    python benchmarks/bench_step.py [--threads 1] [--steps 20] [--rounds 5] [--json FILE]

Reports tokens/s, achieved FLOP/s, and that figure as a fraction of this machine's
measured float32 matmul FLOP/s (the same BLAS, the same thread count). Where PyTorch is
installed it times the same model in PyTorch eager, the two taking turns in ``rounds``
rounds, and prints the median of the per-round ratios (meaningful on a shared machine).
``--json FILE`` writes the figures there too (benchmarks/compare_trees.py reads it).

FLOPs per step (Korthikanti et al. 2022, appendix A; forward + backward, no recomputation):
    72 B L s h^2 (1 + s/(6h) + V/(12 h L))
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's choice)")
parser.add_argument("--steps", type=int, default=20, help="steps per implementation, over all rounds")
parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (minipar, then torch, per round)")
parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
parser.add_argument("--json", default=None, help="also write the figures to this file")
arguments = parser.parse_args()
if arguments.threads:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(arguments.threads)

import json  # noqa: E402
import time  # noqa: E402

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # PYTHONPATH, if set, picks the minipar

try:
    from minipar._threads import start_process  # noqa: E402
except ImportError:  # a tree from before it (compare_trees.py runs this script on older commits)
    start_process = None
if start_process is not None:
    start_process()  # the CLI's process-wide settings first: BLAS threads, MPICH's wait, Ctrl-C (minipar/_threads.py)

from minipar.backend import set_default_dtype, xp  # noqa: E402
from minipar.nn.gpt import GPT, GPTConfig  # noqa: E402
from minipar.optim import AdamW, decay_groups  # noqa: E402

CONFIG = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
BATCH = 12


def model_flops_per_step(batch, layers, length, width, vocab):
    return 72 * batch * layers * length * width**2 * (1 + length / (6 * width) + vocab / (12 * width * layers))


def median_seconds(function, repeats):
    function()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def interleaved_seconds(functions, rounds, steps):
    """{name: [seconds per step, one per round]}: each round runs every function ``steps`` times in turn,
    so a busy spell on a shared machine slows all of them alike and per-round ratios stay fair."""
    for function in functions.values():
        function()  # warm up
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(steps):
                function()
            times[name].append((time.perf_counter() - start) / steps)
    return times


def matmul_flops_per_second(dtype, size=1024):
    a = xp.random.default_rng(0).standard_normal((size, size)).astype(dtype)
    b = a.T.copy()
    return 2 * size**3 / median_seconds(lambda: a @ b, 10)


def minipar_step_function(dtype):
    set_default_dtype(dtype)
    config = GPTConfig(**CONFIG)
    model = GPT(config)
    optimizer = AdamW(decay_groups(model.named_parameters(), 0.1), lr=1e-3)
    rng = xp.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (BATCH, config.block_size + 1))

    def step():
        model.zero_grad()
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()

    return step


def torch_step_function(dtype):
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    c = GPTConfig(**CONFIG)
    layer = torch.nn.TransformerEncoderLayer(c.n_embd, c.n_head, 4 * c.n_embd, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True)
    torch_dtype = getattr(torch, dtype)
    model = torch.nn.ModuleDict({
        "tokens": torch.nn.Embedding(c.vocab_size, c.n_embd), "positions": torch.nn.Embedding(c.block_size, c.n_embd),
        "blocks": torch.nn.TransformerEncoder(layer, c.n_layer, enable_nested_tensor=False),
        "norm": torch.nn.LayerNorm(c.n_embd)}).to(torch_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, c.vocab_size, (BATCH, c.block_size + 1))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(c.block_size)

    def step():
        optimizer.zero_grad()
        x = model["tokens"](ids[:, :-1]) + model["positions"](torch.arange(c.block_size))
        x = model["norm"](model["blocks"](x, mask=mask, is_causal=True))
        logits = x @ model["tokens"].weight.T
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, c.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()

    return step


def main():
    dtype = getattr(xp, arguments.dtype)
    flops = model_flops_per_step(BATCH, CONFIG["n_layer"], CONFIG["block_size"], CONFIG["n_embd"],
                                 CONFIG["vocab_size"])
    peak = matmul_flops_per_second(dtype)
    functions = {"minipar": minipar_step_function(dtype)}
    torch_step = torch_step_function(arguments.dtype)
    if torch_step is not None:
        functions["torch"] = torch_step
    times = interleaved_seconds(functions, arguments.rounds, max(1, arguments.steps // arguments.rounds))
    seconds = sorted(times["minipar"])[len(times["minipar"]) // 2]
    tokens = BATCH * CONFIG["block_size"]
    print(f"model: {CONFIG}, batch {BATCH}, {arguments.dtype}, BLAS threads: {arguments.threads or 'default'}")
    print(f"matmul peak (1024^3, measured): {peak / 1e9:8.1f} GFLOP/s")
    print(f"minipar step: {seconds * 1e3:8.1f} ms  {tokens / seconds:10.0f} tokens/s  "
          f"{flops / seconds / 1e9:6.1f} GFLOP/s  = {flops / seconds / peak:.1%} of matmul peak")
    figures = {"GPT step minipar ms": seconds * 1e3}
    if torch_step is None:
        print("PyTorch not installed: no eager comparison")
    else:
        torch_seconds = sorted(times["torch"])[len(times["torch"]) // 2]
        ratios = sorted(a / b for a, b in zip(times["minipar"], times["torch"], strict=True))
        figures["GPT step minipar/torch"] = ratios[len(ratios) // 2]
        print(f"torch eager : {torch_seconds * 1e3:8.1f} ms  {tokens / torch_seconds:10.0f} tokens/s")
        print(f"minipar / torch step time: {ratios[len(ratios) // 2]:.2f}x (median of {arguments.rounds} "
              f"interleaved rounds; range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    from minipar.backend import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: freed activation blocks stay in the heap for reuse
    main()
