"""All-to-all: minipar's hand-built pairwise exchange against MPI's built-in, in one run.

    mpiexec -n 4 python benchmarks/bench_alltoall.py [--repetitions 20]

For each message size (the whole send buffer of one rank, float32, 4 KB … 16 MB, cut into N
equal blocks) the two algorithms run in turn, repetition after repetition, so a burst of load
hits both alike. One timing is the slowest rank's time for one all-to-all (ranks start
together after a barrier); the table shows the median (benchmarks/collective_timing.py).

Algorithm bandwidth is (N−1)/N × bytes / time: the part of its buffer each rank must send
away (every block but its own), per second. "ratio" is the built-in's time over ours (above 1:
ours is faster). Rank 0 prints the table; nothing is written to disk.
"""
import argparse
import os

from collective_timing import SIZES_BYTES, default_repetitions, format_size, median_seconds

from minipar.backend import xp
from minipar.comm import Communicator

ALGORITHMS = ("mpi", "pairwise")


def measure(communicator, nbytes, repetitions):
    """Median seconds per algorithm for one all-to-all of ``nbytes`` per rank."""
    count = nbytes // 4 // communicator.size * communicator.size  # whole blocks
    send, out = xp.ones(count, dtype=xp.float32), xp.empty(count, dtype=xp.float32)
    return median_seconds(communicator, ALGORITHMS,
                          lambda algorithm: communicator.alltoall(send, out, algorithm=algorithm), repetitions)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=None,
                        help="timed runs per size and algorithm (default: more for small messages)")
    parser.add_argument("--max-bytes", type=int, default=SIZES_BYTES[-1], help="largest buffer to time")
    arguments = parser.parse_args()
    communicator = Communicator()
    size = communicator.size
    if communicator.rank == 0:
        print(f"alltoall, float32, {size} ranks; algorithm bandwidth = (N-1)/N * bytes / time, median of repetitions")
        if size > (os.cpu_count() or 1):
            print(f"warning: {size} ranks on {os.cpu_count()} cores; the times measure the OS scheduler as much as MPI")
        print(f"{'size':>7} {'reps':>5} {'built-in us':>12} {'GB/s':>6} {'pairwise us':>12} {'GB/s':>6} {'ratio':>6}")
    for nbytes in (n for n in SIZES_BYTES if n <= arguments.max_bytes):
        repetitions = arguments.repetitions or default_repetitions(nbytes)
        seconds = measure(communicator, nbytes, repetitions)
        if communicator.rank == 0:
            moved = (size - 1) / size * nbytes
            bandwidth = {a: moved / seconds[a] / 1e9 for a in ALGORITHMS}
            print(f"{format_size(nbytes):>7} {repetitions:>5} {seconds['mpi'] * 1e6:>12.1f} {bandwidth['mpi']:>6.2f} "
                  f"{seconds['pairwise'] * 1e6:>12.1f} {bandwidth['pairwise']:>6.2f} "
                  f"{seconds['mpi'] / seconds['pairwise']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
