"""Allreduce bandwidth: minipar's hand-built ring and recursive doubling against MPI's built-in.

    mpiexec -n 4 python benchmarks/bench_allreduce.py [--repetitions 20]

For each message size (float32, 4 KB … 16 MB) every algorithm runs in turn,
repetition after repetition, so a burst of load on the machine hits all of
them alike. One timing is the slowest rank's time for one in-place allreduce
(ranks start together after a barrier); the table shows the median
(benchmarks/collective_timing.py).

Bus bandwidth, as nccl-tests defines it (doc/PERFORMANCE.md), is
2(N−1)/N × bytes / time: the rate at which each rank's link carries the
2(N−1)/N × bytes that a bandwidth-optimal allreduce must move, so numbers
compare across rank counts. "ratio" is our bus bandwidth over the built-in's
(above 1: ours is faster). Rank 0 prints the table; nothing is written to disk.
"""
import argparse
import os

from minipar._threads import start_process  # noqa: E402

start_process()  # the CLI's process-wide settings first: BLAS threads, MPICH's wait, Ctrl-C (minipar/_threads.py)

from collective_timing import SIZES_BYTES, default_repetitions, format_size, median_seconds  # noqa: E402

from minipar.backend import xp  # noqa: E402
from minipar.comm import Communicator  # noqa: E402

ALGORITHMS = ("mpi", "ring", "recursive_doubling")
LABELS = {"mpi": "built-in", "ring": "ring", "recursive_doubling": "rec.doubling"}


def measure(communicator, nbytes, repetitions):
    """Median seconds per algorithm for one in-place allreduce of ``nbytes``."""
    # Zeros stay zero under repeated in-place sums: no overflow, same arithmetic cost.
    buffer = xp.zeros(nbytes // 4, dtype=xp.float32)
    return median_seconds(communicator, ALGORITHMS,
                          lambda algorithm: communicator.allreduce(buffer, algorithm=algorithm), repetitions)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=None,
                        help="timed runs per size and algorithm (default: more for small messages)")
    arguments = parser.parse_args()
    communicator = Communicator()
    size = communicator.size
    bus_factor = 2 * (size - 1) / size

    if communicator.rank == 0:
        print(f"allreduce, float32, {size} ranks; bus bandwidth = 2(N-1)/N * bytes / time, median of repetitions")
        cores = os.cpu_count() or 1
        if size > cores:
            # MPI ranks busy-wait; with more ranks than cores each message waits for the
            # scheduler, so algorithms with more steps (the ring) suffer most.
            print(f"warning: {size} ranks on {cores} cores; the times measure the OS scheduler as much as MPI")
        header = f"{'size':>7} {'reps':>5}"
        for algorithm in ALGORITHMS:
            header += f" {LABELS[algorithm] + ' us':>15} {'GB/s':>6}"
        print(header + f" {'ratio ring':>11} {'ratio rec.dbl':>14}")
    for nbytes in SIZES_BYTES:
        repetitions = arguments.repetitions or default_repetitions(nbytes)
        seconds = measure(communicator, nbytes, repetitions)
        if communicator.rank == 0:
            row = f"{format_size(nbytes):>7} {repetitions:>5}"
            for algorithm in ALGORITHMS:
                bus_bandwidth = bus_factor * nbytes / seconds[algorithm] / 1e9
                row += f" {seconds[algorithm] * 1e6:>15.1f} {bus_bandwidth:>6.2f}"
            # Same bytes, same factor: the bandwidth ratio is the inverse time ratio.
            ring_ratio = seconds["mpi"] / seconds["ring"]
            doubling_ratio = seconds["mpi"] / seconds["recursive_doubling"]
            print(row + f" {ring_ratio:>11.2f} {doubling_ratio:>14.2f}", flush=True)


if __name__ == "__main__":
    from minipar.backend import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: freed activation blocks stay in the heap for reuse
    main()
