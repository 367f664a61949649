"""The planner's predicted step times against measured ones, for every layout of the world, in one run.

    mpiexec -n 8 python benchmarks/bench_plan.py [--steps 4] [--calibration FILE]
    python benchmarks/bench_plan.py --papers      # the published runs: paper vs predicted vs error
                                                  # (the issue's three tables, then BLOOM, MT-NLG, Llama 3)

Calibrates this machine in the same job before and after the measurements and averages the two
(``minipar.plan.calibrate``: GEMM FLOP/s per shape class and the rest of a block's time fitted on
real blocks, α–β fits of the collectives for each group size, AdamW's bandwidth), unless
--calibration gives a file; builds a
Trainer for every dp × tp × pp of the world and a few option variants (ZeRO, sequence parallelism,
recomputation) and measures their steps round-robin (step i of every layout before step i + 1 of
any, so a change of load hits all alike); the median step time of the slowest rank is compared
with ``minipar.plan.cost.step_time`` on the calibrated machine.
Rank 0 prints a Markdown table, the median relative error |predicted − measured| / measured, and
the Spearman rank correlation between predicted and measured times (does the planner order the
layouts right?); the same two for one FLOP/s for every GEMM (the blocks' fit, no shape classes),
from the same calibration.

The ranks share the machine's cores (8 ranks on 2 cores, and other jobs): times are noisy, and the
calibration measures the same shared machine, so compare within one run only.
"""
import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minipar._threads import start_process  # noqa: E402

start_process()  # the CLI's process-wide settings first: BLAS threads, MPICH's wait, Ctrl-C (minipar/_threads.py)


from minipar.backend import xp  # noqa: E402
from minipar.nn.gpt import GPTConfig  # noqa: E402
from minipar.plan.cost import step_time  # noqa: E402
from minipar.plan.model import ModelSpec  # noqa: E402
from minipar.plan.strategy import Strategy  # noqa: E402
from minipar.train import TrainConfig, Trainer  # noqa: E402

MODEL = dict(vocab_size=64, block_size=64, n_layer=8, n_head=8, n_embd=128)  # bench_hybrid's model
BATCH = 16


def layouts(world_size):
    base = []
    for dp, tp, pp in itertools.product(range(1, world_size + 1), repeat=3):
        if dp * tp * pp == world_size:
            microbatches = min(BATCH // dp, 2 * pp) if pp > 1 else 1
            base.append(dict(dp=dp, tp=tp, pp=pp, microbatches=microbatches))
    variants = []
    for layout in base:
        if layout["dp"] > 1 and layout["tp"] * layout["pp"] > 1:
            variants.append({**layout, "zero": 1})
        if layout["dp"] > 1 and layout["pp"] == 1:
            variants.append({**layout, "zero": 3})
        if layout["tp"] > 1 and layout["pp"] > 1:
            variants.append({**layout, "sequence_parallel": True})
        if layout["pp"] > 2:
            variants.append({**layout, "recompute": True})
    return base + variants


def build(world, layout):
    config = TrainConfig(steps=100, batch_size=BATCH, **layout)
    trainer = Trainer(GPTConfig(**MODEL), config, world)
    strategy = Strategy(config.dp, config.tp, config.pp, BATCH, config.microbatches, config.schedule, 1, config.zero,
                        config.sequence_parallel, "full" if config.recompute else "", "fp32")
    return trainer, strategy


def measure_round_robin(world, trainers, steps):
    """Median step time of each trainer (slowest rank), its steps interleaved with the others'.

    Other jobs come and go on a shared machine; taking step i of every layout before step i + 1
    of any spreads a change of load over all layouts instead of charging it to a few.
    """
    ids = xp.random.default_rng(0).integers(0, MODEL["vocab_size"], (BATCH, MODEL["block_size"] + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    for trainer in trainers:
        trainer.train_step(inputs, targets)  # warm up: first-touch allocations, AdamW's moments
    times = [[] for _ in trainers]
    for _ in range(steps):
        for trainer, record in zip(trainers, times, strict=True):
            world.barrier()
            started = time.perf_counter()
            trainer.train_step(inputs, targets)
            record.append(time.perf_counter() - started)
    local = xp.array([statistics.median(record) for record in times])
    world.allreduce(local, op="max")  # the slowest rank sets the step time
    return [float(t) for t in local]


def ranks(values):
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(xs, ys):
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    covariance = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return covariance / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def calibrated_machine(world, path):
    from minipar.plan import calibrate
    from minipar.plan.hardware import Machine, load_machine

    if path:
        machine = load_machine(path, gpus=world.size)
        return machine, dataclasses.replace(machine, gemm_table=[])
    points = calibrate.block_times("float32", 5, world)
    flops, one_rate_overhead = calibrate.block_fit(points)
    table = calibrate.gemm_table("float32", 5, world)
    overhead, per_element = calibrate.rest_fit(points, table)
    bandwidth = calibrate.adam_bandwidth("float32", 5, world)
    fits = calibrate.collective_fits(world, "float32", 5)
    machine = Machine("this machine", world.size, world.size, 1e12, flops, 0, 0, 0, 0, bandwidth, overhead, fits,
                      gemm_table=table, elementwise_seconds=per_element)
    one_rate = Machine("this machine, one GEMM rate", world.size, world.size, 1e12, flops, 0, 0, 0, 0, bandwidth,
                       one_rate_overhead, fits)
    return machine, one_rate


def papers(path):
    """The three accuracy tables (paper, predicted, error) from the stored published values, the
    GPT-3 175B days, and what the two efficiency constants do to the worst row (a coarse grid)."""
    from minipar.plan import hardware
    from minipar.plan import papers as published

    data = published.load(path)
    names = {"korthikanti2022_table5": "Korthikanti et al. 2022, Table 5: iteration time (s)",
             "narayanan2021_table1": "Narayanan et al. 2021, Table 1: teraFLOP/s per GPU",
             "narayanan2021_table2": "Narayanan et al. 2021, Table 2: teraFLOP/s per GPU"}
    for table, rows in published.compare(data).items():
        print(f"\n{names[table]}\n\n| row | paper | predicted | error |\n|---|---|---|---|")
        for row, paper, got, error in rows:
            print(f"| {row} | {paper} | {got:.3g} | {error:+.1%} |")
    units = {"iteration_s": "s per iteration", "tflops_executed": "TFLOP/s per GPU (executed)",
             "tflops_model": "TFLOP/s per GPU (model)"}
    print("\nOther published runs (tests/data/published_runs.json, other_runs: sources and assumptions)\n\n"
          "| run | metric | paper | predicted | error |\n|---|---|---|---|---|")
    for row, metric, paper, got, error in published.compare_other(data):
        print(f"| {row} | {units[metric]} | {paper} | {got:.3g} | {error:+.1%} |")
    pick = published.gpt3_pick(data)
    print(f"\nGPT-3 175B, 1024 A100s, 300B tokens: {pick.strategy.describe()}, {pick.step:.3g} s per step, "
          f"{published.gpt3_days(data, pick):.1f} days (paper: {data['narayanan2021_gpt3_days']['days']})")
    print("\n| GEMM efficiency | memory efficiency | worst row | mean abs error |\n|---|---|---|---|")
    chosen = hardware.GEMM_EFFICIENCY, hardware.MEMORY_EFFICIENCY
    for gemm, memory in itertools.product((0.76, 0.77, 0.78, 0.80), (0.8, 0.9)):
        hardware.GEMM_EFFICIENCY, hardware.MEMORY_EFFICIENCY = gemm, memory
        errors = [abs(error) for rows in published.compare(data).values() for *_, error in rows]
        print(f"| {gemm} | {memory} | {max(errors):.1%} | {statistics.mean(errors):.1%} |")
    hardware.GEMM_EFFICIENCY, hardware.MEMORY_EFFICIENCY = chosen


def average_machines(first, second):
    """The mean of two calibrations of one machine (before and after the measurements)."""
    mean = lambda a, b: (a + b) / 2  # noqa: E731
    fitted = {key: [mean(a, b) for a, b in zip(first.fitted[key], second.fitted[key], strict=True)]
              for key in first.fitted}
    rate = lambda a, b: 2 / (1 / a + 1 / b)  # noqa: E731  (the mean of the two times per FLOP)
    table = [[thin, wide, rate(a, b)] for (thin, wide, a), (*_, b) in zip(first.gemm_table, second.gemm_table,
                                                                          strict=True)]
    return dataclasses.replace(first, flops=rate(first.flops, second.flops), gemm_table=table,
                               overhead_per_block=mean(first.overhead_per_block, second.overhead_per_block),
                               elementwise_seconds=mean(first.elementwise_seconds, second.elementwise_seconds),
                               memory_bandwidth=mean(first.memory_bandwidth, second.memory_bandwidth), fitted=fitted)


def main():
    parser = argparse.ArgumentParser(description="predicted vs measured step times of every layout")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--calibration", default=None, help="a `calibrate` JSON file instead of calibrating now")
    parser.add_argument("--papers", action="store_true",
                        help="only the published runs: Korthikanti Table 5, Narayanan Tables 1 and 2 (no MPI)")
    parser.add_argument("--published", default=str(Path(__file__).resolve().parent.parent / "tests" / "data" /
                                                   "published_runs.json"))
    arguments = parser.parse_args()
    if arguments.papers:
        return papers(arguments.published)
    from minipar.comm import Communicator

    world = Communicator()
    before = calibrated_machine(world, arguments.calibration)
    model = ModelSpec.from_gpt_config(GPTConfig(**MODEL))
    built = [build(world, layout) for layout in layouts(world.size)]
    measured = measure_round_robin(world, [trainer for trainer, _ in built], arguments.steps)
    after = calibrated_machine(world, arguments.calibration)  # again: the load may have changed
    machine, one_rate = (average_machines(first, second) for first, second in zip(before, after, strict=True))
    rows = [(strategy, seconds, step_time(model, strategy, machine, overlap=False))
            for (_, strategy), seconds in zip(built, measured, strict=True)]
    one_rate_steps = [step_time(model, strategy, one_rate, overlap=False)["step"] for _, strategy in built]
    if world.rank == 0:
        print(f"model {MODEL}, global batch {BATCH}, float32, {world.size} ranks, median of {arguments.steps} steps; "
              f"calibration: {machine.flops / 1e9:.2f} GFLOP/s per rank, {machine.overhead_per_block * 1e3:.2f} ms "
              f"per block")
        print("| layout | measured ms | predicted ms | error | compute | bubble | tp | pp | dp | optimizer |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        errors = []
        for strategy, measured, t in rows:
            errors.append(abs(t["step"] - measured) / measured)
            parts = " | ".join(f"{t[k] * 1e3:.0f}" for k in ("compute", "bubble", "tp", "pp", "dp", "optimizer"))
            print(f"| {strategy.describe()} | {measured * 1e3:.0f} | {t['step'] * 1e3:.0f} | "
                  f"{(t['step'] - measured) / measured:+.0%} | {parts} |")
        print(f"median relative error {statistics.median(errors):.1%}; Spearman rank correlation "
              f"{spearman([t['step'] for _, _, t in rows], [m for _, m, _ in rows]):.2f} over {len(rows)} layouts")
        one_errors = [abs(p - m) / m for p, (_, m, _) in zip(one_rate_steps, rows, strict=True)]
        print(f"one GEMM rate for every shape instead: median relative error {statistics.median(one_errors):.1%}; "
              f"Spearman {spearman(one_rate_steps, [m for _, m, _ in rows]):.2f}")


if __name__ == "__main__":
    main()
