"""Data-parallel step time with and without overlapping the gradient allreduce with backward.

    python benchmarks/bench_data_parallel.py [--ranks 2 4] [--steps 20] [--bucket-kib 1024]

launches itself on each rank count under mpiexec (through minipar.testing.run_on_ranks)
and prints one table. The model is the small GPT (4 layers, 4 heads, width 128, context
64, vocabulary 65, float32), global batch 16, AdamW.

Two identical models train side by side, one through DataParallel(overlap=False), one
through DataParallel(overlap=True); their steps alternate, so a burst of load on the
machine hits both alike. For each step every rank starts after a barrier and the step
time is the slowest rank's (forward, backward, gradient sync, optimizer step); the table
shows medians.

  t_comm   the no-overlap step's time inside the blocking allreduces (mean over ranks);
           it includes waiting for the slowest rank to arrive
  t_wait   the overlap step's time blocked in Iallreduce calls (posting and waiting)
  saved    t_no_overlap − t_overlap, the median over steps of the paired difference
           (each overlap step is timed right after its no-overlap twin, so slow drifts
           of the machine's load cancel)
  hidden   saved / t_comm: the fraction of the communication time that overlap took off
           the step (0: nothing gained; 1: all of it hidden; noise can push it outside)
"""
import argparse
import json
import statistics
import time

from minipar._threads import start_process  # noqa: E402

start_process()  # the CLI's process-wide settings first: BLAS threads, MPICH's wait, Ctrl-C (minipar/_threads.py)

from mpi4py import MPI  # noqa: E402

from minipar.backend import from_host, host_rng, xp  # noqa: E402
from minipar.comm import Communicator  # noqa: E402
from minipar.nn.gpt import GPT, GPTConfig  # noqa: E402
from minipar.optim import AdamW, decay_groups  # noqa: E402
from minipar.parallel.data_parallel import DataParallel, local_slice, validate_data_parallel  # noqa: E402

CONFIG = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
GLOBAL_BATCH = 16


def global_batch(step):
    tokens = host_rng([0, step]).integers(0, CONFIG["vocab_size"], size=(GLOBAL_BATCH, CONFIG["block_size"] + 1))
    tokens = from_host(tokens)
    return xp.ascontiguousarray(tokens[:, :-1]), xp.ascontiguousarray(tokens[:, 1:])


def timed_step(communicator, model, optimizer, dp, step):
    """(slowest rank's step seconds, this rank's seconds inside allreduce calls)."""
    inputs, targets = local_slice(global_batch(step), communicator.rank, communicator.size)
    communicator.reset_counters()
    communicator.barrier()
    started = time.perf_counter()
    _, loss = model(inputs, targets)
    loss.backward()
    dp.finish_gradient_sync()
    optimizer.step()
    optimizer.zero_grad()
    elapsed = time.perf_counter() - started
    communication = sum(communicator.counters[name].seconds for name in ("allreduce", "iallreduce"))
    slowest = communicator.mpi.allreduce(elapsed, op=MPI.MAX)  # one float: pickled metadata is fine
    return slowest, communicator.mpi.allreduce(communication) / communicator.size


def measure_on_ranks(comm, steps, bucket_kib):
    """Run on every rank (under mpiexec); rank 0 prints one RESULT line of JSON."""
    communicator = Communicator(comm)
    validate_data_parallel(GLOBAL_BATCH, communicator.size, communicator.size, bucket_kib * 1024)
    runs = {}
    for overlap in (False, True):
        model = GPT(GPTConfig(**CONFIG))
        optimizer = AdamW(decay_groups(model.named_parameters(), 0.1), lr=1e-3)
        dp = DataParallel(model.parameters(), communicator, bucket_bytes=bucket_kib * 1024, overlap=overlap)
        runs[overlap] = (model, optimizer, dp)
    samples = {False: [], True: []}
    for step in range(steps + 2):  # the first two steps warm up caches and MPI connections
        for overlap in (False, True):
            step_seconds, communication_seconds = timed_step(communicator, *runs[overlap], step)
            if step >= 2:
                samples[overlap].append((step_seconds, communication_seconds))
    if communicator.rank == 0:
        median = statistics.median
        dp = runs[False][2]
        result = {
            "ranks": communicator.size,
            "parameters": sum(p.size for p in runs[False][0].parameters()),
            "gradient_bytes": dp.gradient_bytes,
            "buckets": len(dp.buckets),
            "step_no_overlap": median([s for s, _ in samples[False]]),
            "step_overlap": median([s for s, _ in samples[True]]),
            "comm": median([c for _, c in samples[False]]),
            "wait_overlap": median([c for _, c in samples[True]]),
            "saved": median([no[0] - yes[0] for no, yes in zip(samples[False], samples[True])]),
        }
        print("RESULT " + json.dumps(result), flush=True)


def main():
    from minipar.testing import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode (after 2 warm-up steps)")
    parser.add_argument("--bucket-kib", type=int, default=1024, help="bucket size in KiB")
    arguments = parser.parse_args()
    rows = []
    for ranks in arguments.ranks:
        output = run_on_ranks(ranks, "benchmarks.bench_data_parallel:measure_on_ranks", timeout=1200,
                              steps=arguments.steps, bucket_kib=arguments.bucket_kib)
        rows.append(json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:]))
    first = rows[0]
    print(f"data parallel GPT: {first['parameters']:,} parameters, {first['gradient_bytes'] / 2**20:.2f} MiB of "
          f"float32 gradients in {first['buckets']} buckets of <= {arguments.bucket_kib} KiB; "
          f"global batch {GLOBAL_BATCH} x {CONFIG['block_size']} tokens; medians of {arguments.steps} steps")
    print(f"{'ranks':>5} {'no overlap ms':>14} {'overlap ms':>11} {'saved ms':>9} {'t_comm ms':>10} "
          f"{'t_wait ms':>10} {'hidden':>7}")
    for row in rows:
        print(f"{row['ranks']:>5} {row['step_no_overlap'] * 1e3:>14.1f} {row['step_overlap'] * 1e3:>11.1f} "
              f"{row['saved'] * 1e3:>9.1f} {row['comm'] * 1e3:>10.1f} {row['wait_overlap'] * 1e3:>10.1f} "
              f"{row['saved'] / row['comm']:>7.2f}")


if __name__ == "__main__":
    from minipar.backend import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: freed activation blocks stay in the heap for reuse
    main()
