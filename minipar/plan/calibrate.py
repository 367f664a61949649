"""``python -m minipar calibrate``: measure this machine into a profile that ``plan`` reads.

    mpiexec -n 8 python -m minipar calibrate --out out/calibration.json
    python -m minipar plan --machine out/calibration.json --gpus 8 --precision fp32 ...

Every rank measures at the same time, as in a training run, so ranks that share cores (8 ranks
on 2 cores) measure their share, which is what a step on them will get:

- matmul FLOP/s per rank ($1024² × 1024$ in the training dtype), for reference;
- GEMM FLOP/s per shape class: $(thin × wide)·(wide × wide)$ on a grid of thin 4 … 256 and wide
  32 … 512 (kernels.THIN, WIDE), the rates at which the planner times each GEMM of a layer,
  forward and backward, by its shape (kernels.gemm_seconds_cpu): a 4-row product runs far below
  a 256-row one;
- a transformer block's forward + backward at two widths; what its GEMMs at those rates do not
  explain is fitted as $c + e·n$ per block of $n$ elements (Python and NumPy call overheads, which dominate
  small models, and the elementwise kernels). Fitting $t = 3·F_{block}/F + c$ instead gives one
  achieved FLOP/s $F$ on real blocks (kept for MFU and for files without the table);
- AdamW's update over 4M parameters, as a bandwidth $2·16Ψ/t$ (the optimizer term of the model);
- for every group size $g$ dividing the world (world/$g$ groups at once, like the grid's), the
  time of allreduce, all-gather, reduce-scatter and broadcast at message sizes 1 KiB … 4 MiB,
  fitted by least squares to $t = a + n·b$ (α–β per call), and a point-to-point send.

World rank 0 writes the JSON file (a ``minipar.plan.hardware.Machine``).
"""
import json
import os
import statistics
import time
from functools import partial

from minipar.backend import xp

SIZES = (1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22)  # bytes
BURST = 4  # calls back to back per timing: a step's calls follow one another, not a barrier each


def _repeat(call, times):
    for _ in range(times):
        call()


def add_arguments(parser):
    parser.add_argument("--out", default="out/calibration.json", help="where rank 0 writes the profile")
    parser.add_argument("--repeats", type=int, default=5, help="timings per point (the median is kept)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")


def _median_time(function, repeats, comm=None):
    """Median over ``repeats`` of the slowest rank's time (a collective ends when its last rank does)."""
    times = []
    for _ in range(repeats):
        if comm is not None:
            comm.barrier()
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    local = xp.array([statistics.median(times)])
    if comm is not None:
        comm.allreduce(local, op="max")
    return float(local[0])


def matmul_flops(dtype, repeats, world):
    a = xp.ones((1024, 1024), dtype=dtype)
    return 2 * 1024 ** 3 / _median_time(lambda: a @ a, repeats, world)


BLOCK_POINTS = ((32, 2, 16), (256, 8, 64))  # (width, batch, length) of the two measured blocks


def block_times(dtype, repeats, world):
    """[(width, batch, length, FLOPs, seconds)] of a 4-head block's forward + backward at BLOCK_POINTS."""
    from minipar.nn.layers import Block
    from minipar.tensor import Tensor

    points = []
    for width, batch, length in BLOCK_POINTS:
        block = Block(width, 4).to(dtype)
        for p in block.parameters():
            p.data[...] = xp.asarray(0.02, dtype=p.dtype)
        x = Tensor(xp.ones((batch, length, width), dtype=getattr(xp, dtype)), requires_grad=True)

        def step(block=block, x=x):
            block(x).sum().backward()

        step()
        flops = 3 * 24 * batch * length * width * width * (1 + length / (6 * width))
        points.append((width, batch, length, flops, _median_time(step, repeats, world)))
    return points


def block_fit(points):
    """(achieved FLOP/s, seconds per block) through the two blocks' (FLOPs, seconds): one rate for all."""
    (*_, f1, t1), (*_, f2, t2) = points
    per_flop = max((t2 - t1) / (f2 - f1), 1e-15)
    return 1 / per_flop, max(t1 - f1 * per_flop, 0.0)


def gemm_table(dtype, repeats, world, work=20_000_000):
    """[[thin, wide, FLOP/s]] on kernels.THIN × kernels.WIDE: (thin × wide)·(wide × wide) products,
    each timed over enough calls back to back to do ``work`` FLOPs (milliseconds) (kernels.py)."""
    from minipar.plan.kernels import THIN, WIDE

    table = []
    for thin in THIN:
        for wide in WIDE:
            m = min(thin, wide)  # a class thinner than wide: its thin side is the smallest
            a, b = xp.ones((m, wide), dtype=dtype), xp.ones((wide, wide), dtype=dtype)
            flops = 2 * m * wide * wide
            calls = max(1, work // flops)
            seconds = _median_time(partial(_repeat, lambda a=a, b=b: a @ b, calls), repeats, world) / calls
            table.append([thin, wide, flops / seconds])
    return table


def rest_fit(points, table):
    """(c, e) of the block's time that its GEMMs at the table's rates do not explain: c + e·elements
    per block forward + backward (kernels.py), through the two blocks; both kept non-negative."""
    from minipar.plan.hardware import Machine
    from minipar.plan.kernels import block_elements, cpu_layer_times
    from minipar.plan.model import ModelSpec
    from minipar.plan.strategy import Strategy

    machine = Machine("gemms only", 1, 1, 0.0, 1.0, 0, 0, 0, 0, 1.0, gemm_table=table)
    rests = []
    for width, batch, length, _, seconds in points:
        model, strategy = ModelSpec(1, width, 4, length, 8), Strategy(1, 1, 1, batch)
        gemms = cpu_layer_times(model, strategy, machine)
        rests.append((block_elements(model, strategy), seconds - gemms["forward"] - gemms["backward"]))
    (n1, r1), (n2, r2) = rests
    per_element = max((r2 - r1) / (n2 - n1), 0.0)
    overhead = max(r1 - n1 * per_element, 0.0)
    if overhead == 0.0:  # the line through both would start below zero: through the larger one alone
        per_element = max(r2 / n2, 0.0)
    return overhead, per_element


def adam_bandwidth(dtype, repeats, world):
    from minipar.nn.module import Parameter
    from minipar.optim import AdamW

    p = Parameter(xp.zeros(1 << 22, dtype=getattr(xp, dtype)))
    p.grad = xp.ones_like(p.data)
    optimizer = AdamW([p], lr=1e-3)
    optimizer.step()
    held = 4 * p.data.nbytes  # parameter, gradient, m, v
    return 2 * held / _median_time(optimizer.step, repeats, world)


def fit_line(points):
    """Least squares $t = a + b·n$ over $(n, t)$ points; $a$ and $b$ kept non-negative."""
    count = len(points)
    mean_n = sum(n for n, _ in points) / count
    mean_t = sum(t for _, t in points) / count
    spread = sum((n - mean_n) ** 2 for n, _ in points)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / spread if spread else 0.0
    slope = max(slope, 0.0)
    return [max(mean_t - slope * mean_n, 0.0), slope]


def collective_fits(world, dtype, repeats):
    """{"allreduce/4": [a, b], ...} for every group size g > 1 dividing the world."""
    fits = {}
    itemsize = xp.dtype(dtype).itemsize
    for size in (g for g in range(2, world.size + 1) if world.size % g == 0):
        group = world.split(color=world.rank // size, key=world.rank)
        for kind in ("allreduce", "allgather", "reduce_scatter", "broadcast"):
            points = []
            for nbytes in SIZES:
                n = max(size, nbytes // itemsize // size * size)  # a multiple of the group size
                full = xp.ones(n, dtype=dtype)
                part = xp.empty(n // size, dtype=dtype)
                call = {"allreduce": partial(group.allreduce, full),
                        "allgather": partial(group.allgather, part, full),
                        "reduce_scatter": partial(group.reduce_scatter, full, part),
                        "broadcast": partial(group.broadcast, full, root=0)}[kind]
                points.append((n * itemsize, _median_time(partial(_repeat, call, BURST), repeats, world) / BURST))
            fits[f"{kind}/{size}"] = fit_line(points)
        group.mpi.Free()
    if world.size > 1:  # pairs (0,1), (2,3), ...: every rank busy, as in a pipeline
        peer = world.rank ^ 1 if (world.rank ^ 1) < world.size else world.rank
        points = []
        for nbytes in SIZES:
            buffer = xp.ones(nbytes // itemsize, dtype=dtype)

            def exchange(buffer=buffer):
                if peer != world.rank:
                    world.sendrecv(buffer, peer, buffer.copy(), peer)

            points.append((nbytes, _median_time(exchange, repeats, world)))
        for size in range(2, world.size + 1):
            fits[f"send/{size}"] = fit_line(points)
    return fits


def run(arguments):
    from minipar.comm import Communicator
    from minipar.errors import require_positive_int
    from minipar.plan.hardware import Machine

    require_positive_int("--repeats", arguments.repeats)
    world = Communicator()
    dtype = arguments.dtype
    matmul = matmul_flops(dtype, arguments.repeats, world)
    points = block_times(dtype, arguments.repeats, world)
    flops, _ = block_fit(points)
    table = gemm_table(dtype, arguments.repeats, world)
    overhead, per_element = rest_fit(points, table)
    bandwidth = adam_bandwidth(dtype, arguments.repeats, world)
    fits = collective_fits(world, dtype, arguments.repeats)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / world.size
    machine = Machine(f"this machine ({world.size} ranks, {dtype})", world.size, world.size, memory, flops,
                      0.0, 0.0, 0.0, 0.0, bandwidth, overhead, fits,
                      source=f"python -m minipar calibrate; matmul 1024^3: {matmul / 1e9:.2f} GFLOP/s per rank",
                      gemm_table=table, elementwise_seconds=per_element)
    if world.rank == 0:
        directory = os.path.dirname(arguments.out)
        if directory:
            os.makedirs(directory, exist_ok=True)
        temporary = arguments.out + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(machine.to_json())
        os.replace(temporary, arguments.out)  # atomic: a reader never sees half a file
        print(f"{world.size} ranks: matmul {matmul / 1e9:.2f} GFLOP/s per rank; blocks {flops / 1e9:.2f} GFLOP/s; "
              f"GEMMs {min(r for *_, r in table) / 1e9:.2f}-{max(r for *_, r in table) / 1e9:.2f} GFLOP/s over "
              f"{len(table)} shape classes + {overhead * 1e3:.2f} ms per block + {per_element * 1e9:.2f} ns per "
              f"element; AdamW {bandwidth / 1e9:.2f} GB/s; {len(fits)} collective fits -> {arguments.out}")
        print("GEMM GFLOP/s by shape class (thin x wide by wide x wide): " +
              ", ".join(f"{thin}x{wide}: {rate / 1e9:.2f}" for thin, wide, rate in table))
        print(json.dumps({key: [f"{a * 1e6:.1f} us", f"{1 / b / 1e9 if b else float('inf'):.2f} GB/s"]
                          for key, (a, b) in sorted(fits.items()) if not key.startswith("send/") or key == "send/2"}))
    return 0
