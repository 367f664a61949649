"""The GPU check: one command, a few minutes on one GPU, for whoever has one.

    python -m pip install -e ".[gpu]"          # CuPy for CUDA 12; PyTorch too, for the speed ratio
    MINIPAR_BACKEND=cupy python benchmarks/gpu_check.py
    MINIPAR_BACKEND=devicesim python benchmarks/gpu_check.py --tiny   # the same script on the CPU stand-in

1. equality: one float64 training step of every mode (dp, tp, sequence parallel, pipeline
   schedules, ZeRO 1-3, hand-built and hierarchical allreduces, fp16/bf16/top-k/PowerSGD
   compression, local SGD, 3D) at 1, 2 and 4 ranks sharing the GPU, over
   each transport that can run here, against the same step under NumPy. CuPy's kernels sum
   in other orders than NumPy's, so CuPy must agree to rtol 1e-9; devicesim, which is NumPy
   underneath, must agree bitwise.
2. speed: one fp32 training step (forward, backward, AdamW) of minipar and of PyTorch eager
   on the same device, for nanoGPT's shakespeare-char shape (L6 H6 C384 T256 B64 V65) and
   GPT-2 small (L12 H12 C768 T1024 B8 V50304), and the throughput ratio (goal: >= 0.7).
3. memory: each rank's peak device memory during steps against Trainer.memory_report
   (parameters, gradients, optimizer state; the rest of the peak is activations).

Prints a summary, writes every figure to --out (JSON), exits 1 if any equality fails.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minipar._threads import start_process  # noqa: E402

start_process()  # the CLI's process-wide settings first: BLAS threads, MPICH's wait, Ctrl-C (minipar/_threads.py)


import numpy  # noqa: E402

MODEL = dict(vocab_size=16, block_size=8, n_layer=8, n_head=4, n_embd=32)
BATCH = 8
CASES = {  # every mode at the world size that shows it; each runs one step
    1: [{}, dict(microbatches=2, recompute=True)],
    2: [dict(dp=2), dict(tp=2), dict(tp=2, sequence_parallel=True), dict(pp=2, microbatches=2),
        dict(pp=2, microbatches=4, schedule="gpipe"), dict(dp=2, zero=1), dict(dp=2, zero=2), dict(dp=2, zero=3),
        dict(dp=2, allreduce="ring"), dict(dp=2, overlap=True, bucket_megabytes=0.01, microbatches=2),
        dict(dp=2, compress="fp16"), dict(dp=2, compress="bf16"), dict(dp=2, compress="topk"),
        dict(dp=2, compress="powersgd"), dict(dp=2, local_sgd=1)],
    4: [dict(dp=2, tp=2), dict(dp=2, pp=2, microbatches=2), dict(tp=2, pp=2, microbatches=2, sequence_parallel=True),
        dict(pp=4, microbatches=4, schedule="interleaved", virtual_stages=2), dict(dp=4, zero=3),
        dict(dp=2, tp=2, zero=2, sequence_parallel=True), dict(dp=4, allreduce="recursive_doubling"),
        dict(dp=4, allreduce="tree"), dict(dp=4, allreduce="hierarchical", ranks_per_node=2)],
}
SHAPES = {  # name: (GPTConfig fields, batch)
    "shakespeare L6 C384 T256 B64": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 64),
    "gpt2-small L12 C768 T1024 B8": (dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 8),
}
TINY_SHAPES = {
    "tiny L2 C32 T16 B4 V65": (dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32), 4),
    "tiny L1 C16 T8 B2 V256": (dict(vocab_size=256, block_size=8, n_layer=1, n_head=2, n_embd=16), 2),
}


def batch(model_config, rows, seed):
    ids = numpy.random.default_rng(seed).integers(0, model_config.vocab_size, (rows, model_config.block_size + 1))
    return ids[:, :-1], ids[:, 1:]


# ---- on the ranks ------------------------------------------------------------------------

def equality_worker(comm, out):
    """One step of every case for this world size; rank 0 saves loss and full parameters per case."""
    from minipar.backend import from_host, to_host
    from minipar.comm import Communicator
    from minipar.comm.transport import select_device
    from minipar.nn.gpt import GPTConfig
    from minipar.train import TrainConfig, Trainer

    select_device(comm)  # before NCCL or any device memory
    world = Communicator(comm)
    for index, case in enumerate(CASES[world.size]):
        model_config = GPTConfig(**MODEL)
        config = TrainConfig(steps=1, batch_size=BATCH, dtype="float64", warmup_steps=0, learning_rate=1e-2, **case)
        trainer = Trainer(model_config, config, world)
        inputs, targets = batch(model_config, BATCH, seed=index)
        loss = trainer.train_step(from_host(inputs), from_host(targets))
        state = trainer.gather_state()
        if world.rank == 0:
            arrays = {name: to_host(value) for name, value in state.items()}
            numpy.savez(os.path.join(out, f"{world.size}-{index}.npz"), loss=numpy.array(loss), **arrays)


def memory_worker(comm, layout, steps=2):
    """Peak device memory of each rank over a few steps, and what Trainer.memory_report accounts for."""
    from minipar.backend import from_host
    from minipar.comm import Communicator
    from minipar.comm.transport import select_device
    from minipar.nn.gpt import GPTConfig
    from minipar.train import TrainConfig, Trainer

    select_device(comm)
    meter = PeakMemory()
    world = Communicator(comm)
    model_config = GPTConfig(**MODEL)
    trainer = Trainer(model_config, TrainConfig(steps=steps, batch_size=BATCH, **layout), world)
    for step in range(steps):
        inputs, targets = batch(model_config, BATCH, seed=step)
        trainer.train_step(from_host(inputs), from_host(targets))
    report = {"rank": world.rank, "peak_bytes": meter.peak(), "memory_report": trainer.memory_report(),
              "layout": layout, "measured_with": meter.how}
    return report


class PeakMemory:
    """Peak bytes allocated since creation: CuPy's memory pool on a GPU, tracemalloc on the host."""

    def __init__(self):
        from minipar.backend import BACKEND_NAME, xp

        if BACKEND_NAME == "cupy":  # every allocation goes through the pool: note its high-water mark
            pool, self._peak, self.how = xp.get_default_memory_pool(), 0, "cupy memory pool"

            def malloc(nbytes):
                memory = pool.malloc(nbytes)
                self._peak = max(self._peak, pool.used_bytes())
                return memory

            xp.cuda.set_allocator(malloc)
            self.peak = lambda: self._peak
        else:  # NumPy reports its allocations to tracemalloc
            import tracemalloc

            tracemalloc.start()
            self.how = "tracemalloc (host)"
            self.peak = lambda: tracemalloc.get_traced_memory()[1]


# ---- in this process ---------------------------------------------------------------------

def minipar_step_ms(model_fields, rows, steps):
    from minipar.backend import from_host, set_default_dtype, synchronize, xp
    from minipar.nn.gpt import GPT, GPTConfig
    from minipar.optim import AdamW, decay_groups

    set_default_dtype(xp.float32)
    config = GPTConfig(**model_fields)
    model = GPT(config)
    optimizer = AdamW(decay_groups(model.named_parameters(), 0.1), lr=1e-4)
    inputs, targets = (from_host(ids) for ids in batch(config, rows, seed=0))

    def step():
        model.zero_grad()
        model(inputs, targets)[1].backward()
        optimizer.step()

    return median_ms(step, steps, synchronize)


def torch_step_ms(model_fields, rows, steps):
    """The same model and step in PyTorch eager fp32 on the GPU, or None without PyTorch and CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    model = torch_gpt(torch, **model_fields).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, model_fields["vocab_size"], (rows, model_fields["block_size"] + 1), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()

    return median_ms(step, steps, torch.cuda.synchronize)


def torch_gpt(torch, vocab_size, block_size, n_layer, n_head, n_embd):
    """GPT-2's architecture (pre-LayerNorm blocks, tanh GELU, tied embedding) in plain PyTorch."""
    nn, functional = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
            self.qkv, self.projection = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
            self.up, self.down = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

        def forward(self, x):
            rows, length, _ = x.shape
            heads = (t.view(rows, length, n_head, -1).transpose(1, 2) for t in self.qkv(self.norm1(x)).split(n_embd, 2))
            attended = functional.scaled_dot_product_attention(*heads, is_causal=True)
            x = x + self.projection(attended.transpose(1, 2).reshape(rows, length, n_embd))
            return x + self.down(functional.gelu(self.up(self.norm2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
            self.blocks = nn.Sequential(*(Block() for _ in range(n_layer)))
            self.norm = nn.LayerNorm(n_embd)

        def forward(self, ids):
            x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
            return self.norm(self.blocks(x)) @ self.tokens.weight.T

    return GPT()


def median_ms(step, repeats, synchronize):
    step()  # warm up: kernels compile, memory pools fill
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


# ---- orchestration -----------------------------------------------------------------------

def available_transports(nranks):
    from minipar.backend import BACKEND_NAME, device_count
    from minipar.comm.transport import mpi_reports_cuda_support, transport_problem

    nccl = False
    if BACKEND_NAME == "cupy":
        from minipar.comm.transport import _nccl_available

        nccl = _nccl_available()
    ranks_per_gpu = -(-nranks // max(device_count(), 1))
    return [name for name in ("staged", "cuda-aware", "nccl")
            if transport_problem(name, BACKEND_NAME, mpi_reports_cuda_support(), nccl, ranks_per_gpu) is None]


def run_equality(device_backend, folder, bitwise):
    from minipar.testing import run_on_ranks

    results = []
    for nranks in CASES:
        os.environ.update(MINIPAR_BACKEND="numpy", MINIPAR_TRANSPORT="staged")
        reference = os.path.join(folder, f"numpy-{nranks}")
        os.makedirs(reference)
        run_on_ranks(nranks, "benchmarks.gpu_check:equality_worker", timeout=300, out=reference)
        for transport in available_transports(nranks):
            os.environ.update(MINIPAR_BACKEND=device_backend, MINIPAR_TRANSPORT=transport)
            device = os.path.join(folder, f"{device_backend}-{transport}-{nranks}")
            os.makedirs(device)
            run_on_ranks(nranks, "benchmarks.gpu_check:equality_worker", timeout=300, out=device)
            for index, case in enumerate(CASES[nranks]):
                results.append(compare(reference, device, nranks, index, case, transport, bitwise))
    os.environ["MINIPAR_BACKEND"] = device_backend
    return results


def compare(reference_folder, device_folder, nranks, index, case, transport, bitwise):
    name = f"{nranks}-{index}.npz"
    with numpy.load(os.path.join(reference_folder, name)) as expected, \
            numpy.load(os.path.join(device_folder, name)) as got:
        keys = sorted(expected.files)
        same_keys = keys == sorted(got.files)
        worst = max(float(numpy.max(numpy.abs(got[key] - expected[key]), initial=0.0)) for key in keys)
        if bitwise:
            equal = same_keys and all(numpy.array_equal(got[key], expected[key]) for key in keys)
        else:
            equal = same_keys and all(numpy.allclose(got[key], expected[key], rtol=1e-9, atol=1e-12) for key in keys)
    return {"ranks": nranks, "transport": transport, "case": case, "equal": bool(equal), "max_abs_diff": worst}


def run_memory(layouts):
    from minipar.testing import results_from_ranks

    reports = []
    for layout in layouts:
        nranks = layout.get("dp", 1) * layout.get("tp", 1) * layout.get("pp", 1)
        reports += results_from_ranks(nranks, "benchmarks.gpu_check:memory_worker", timeout=300, layout=layout)
    return reports


def environment():
    """What the figures were measured on."""
    from mpi4py import MPI

    from minipar.backend import BACKEND_NAME, device_count, xp
    from minipar.comm.transport import mpi_reports_cuda_support

    facts = {"backend": BACKEND_NAME, "devices": device_count(), "mpi": MPI.Get_library_version().splitlines()[0],
             "mpi_reports_cuda_support": mpi_reports_cuda_support(), "python": sys.version.split()[0],
             "numpy": numpy.__version__}
    if BACKEND_NAME == "cupy":
        facts.update(cupy=xp.__version__, gpu=xp.cuda.runtime.getDeviceProperties(0)["name"].decode())
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        facts["torch"] = None
    return facts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes and few steps (CI, devicesim)")
    parser.add_argument("--parts", default="equality,speed,memory", help="which parts to run, comma-separated")
    parser.add_argument("--out", default="out/gpu_check.json")
    arguments = parser.parse_args()
    parts = set(arguments.parts.split(","))
    device_backend = os.environ.get("MINIPAR_BACKEND", "cupy")
    if device_backend not in ("cupy", "devicesim"):
        sys.exit("set MINIPAR_BACKEND=cupy (a GPU) or MINIPAR_BACKEND=devicesim (the CPU stand-in)")
    os.environ["MINIPAR_BACKEND"] = device_backend
    import minipar.backend  # noqa: F401  (this process computes on the device backend; ranks choose their own)

    started = time.perf_counter()
    facts = environment()
    print("environment: " + ", ".join(f"{key} {value}" for key, value in facts.items()))
    equality, speed, memory = [], {}, []
    if "equality" in parts:
        with tempfile.TemporaryDirectory() as folder:
            equality = run_equality(device_backend, folder, bitwise=device_backend == "devicesim")
    for row in equality:
        print(f"equality {row['ranks']} ranks {row['transport']:10s} {str(row['case']):70s} "
              f"{'ok' if row['equal'] else 'DIFFERS'}  max |diff| {row['max_abs_diff']:.1e}")
    for name, (fields, rows) in (TINY_SHAPES if arguments.tiny else SHAPES).items() if "speed" in parts else ():
        steps = 2 if arguments.tiny else 5
        ours, theirs = minipar_step_ms(fields, rows, steps), torch_step_ms(fields, rows, steps)
        speed[name] = {"minipar_ms": ours, "torch_eager_ms": theirs,
                       "throughput_vs_torch": None if theirs is None else theirs / ours}
        versus = "PyTorch eager not available" if theirs is None else \
            f"PyTorch eager {theirs:8.1f} ms, minipar throughput = {theirs / ours:.2f}x PyTorch's"
        print(f"speed {name:32s} minipar {ours:8.1f} ms/step; {versus}")
    if "memory" in parts:
        memory = run_memory([{}, dict(dp=2, zero=1), dict(dp=2, tp=2)])
    for row in memory:
        accounted = row["memory_report"]["total"]
        print(f"memory {str(row['layout']):24s} rank {row['rank']}: peak {row['peak_bytes'] / 2**20:8.2f} MiB, "
              f"memory report {accounted / 2**20:8.2f} MiB ({row['measured_with']})")
    os.makedirs(os.path.dirname(os.path.abspath(arguments.out)), exist_ok=True)
    with open(arguments.out, "w") as file:
        json.dump({"environment": facts, "equality": equality, "speed": speed, "memory": memory,
                   "seconds": time.perf_counter() - started}, file, indent=1, default=int)
    failed = [row for row in equality if not row["equal"]]
    print(f"{len(equality) - len(failed)} of {len(equality)} equality checks passed; "
          f"{time.perf_counter() - started:.0f} s; figures in {arguments.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
