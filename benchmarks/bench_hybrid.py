"""Every factorisation of the world into dp x tp x pp, measured in one run.

    mpiexec -n 8 python benchmarks/bench_hybrid.py [--steps 6] [--zero 0]

For each layout: median step time, bytes each rank sends per step in each group (read from
the dp, tp and pp communicators' counters, so they are the traffic of that dimension
alone), and the largest per-rank bytes of parameters + gradients + optimizer states.
Rank 0 prints a Markdown table (docs/hybrid.md quotes one).

The ranks share the machine's cores: on a 2-core machine 8 ranks time-slice, so compare
step times only between layouts of the same run; bytes and memory do not depend on load.
"""
import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minipar._threads import start_process  # noqa: E402

start_process()  # the CLI's process-wide settings first: BLAS threads, MPICH's wait, Ctrl-C (minipar/_threads.py)


from minipar.backend import xp  # noqa: E402
from minipar.comm import Communicator  # noqa: E402
from minipar.nn.gpt import GPTConfig  # noqa: E402
from minipar.train import TrainConfig, Trainer  # noqa: E402

# The small GPT, with 8 heads and 8 layers so that tp = 8 and pp = 8 both divide it.
MODEL = dict(vocab_size=64, block_size=64, n_layer=8, n_head=8, n_embd=128)
BATCH = 16


def factorisations(world_size):
    return [(dp, tp, pp) for dp, tp, pp in itertools.product(range(1, world_size + 1), repeat=3)
            if dp * tp * pp == world_size]


def measure(world, dp, tp, pp, steps, zero):
    microbatches = min(BATCH // dp, 2 * pp) if pp > 1 else 1
    config = TrainConfig(steps=steps + 1, batch_size=BATCH, dp=dp, tp=tp, pp=pp, microbatches=microbatches,
                         zero=zero if dp > 1 else 0)
    trainer = Trainer(GPTConfig(**MODEL), config, world)
    ids = xp.random.default_rng(0).integers(0, MODEL["vocab_size"], (BATCH, MODEL["block_size"] + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    trainer.train_step(inputs, targets)  # warm up: first-touch allocations, buffers
    groups = {"dp": trainer.grid.dp, "tp": trainer.grid.tp, "pp": trainer.grid.pp}
    for communicator in groups.values():
        communicator.reset_counters()
    times = []
    for _ in range(steps):
        world.barrier()
        start = time.perf_counter()
        trainer.train_step(inputs, targets)
        times.append(time.perf_counter() - start)
    sent = {name: sum(record["bytes_sent"] for record in communicator.counters_snapshot().values()) / steps
            for name, communicator in groups.items()}
    memory = trainer.memory_report()["total"]
    local = xp.array([statistics.median(times), sent["dp"], sent["tp"], sent["pp"], memory], dtype=xp.float64)
    largest = xp.empty_like(local)
    world.allreduce(local, out=largest, op="max")  # the slowest rank sets the step time
    return microbatches, largest


def main():
    parser = argparse.ArgumentParser(description="dp x tp x pp factorisations of the world, measured")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    arguments = parser.parse_args()
    world = Communicator()
    rows = []
    for dp, tp, pp in factorisations(world.size):
        microbatches, (seconds, dp_bytes, tp_bytes, pp_bytes, memory) = measure(world, dp, tp, pp, arguments.steps,
                                                                                  arguments.zero)
        rows.append(f"| {dp} x {tp} x {pp} | {microbatches} | {seconds * 1e3:8.1f} | {dp_bytes / 2**20:7.2f} | "
                    f"{tp_bytes / 2**20:7.2f} | {pp_bytes / 2**20:7.2f} | {memory / 2**20:6.2f} |")
    if world.rank == 0:
        print(f"model {MODEL}, global batch {BATCH}, float32, ZeRO {arguments.zero} where dp > 1, "
              f"{world.size} ranks, median of {arguments.steps} steps")
        print("| dp x tp x pp | micro-batches | step ms | dp MiB/step | tp MiB/step | pp MiB/step | "
              "params+grads+optimizer MiB (max rank) |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    from minipar.backend import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: freed activation blocks stay in the heap for reuse
    main()
