"""The timing loop bench_allreduce.py and bench_alltoall.py share.

One timing is the slowest rank's time for one collective: the ranks start together after a
barrier, and the largest of their times is the collective's (it is done when the last rank
is). The algorithms run in turn, repetition after repetition, so a burst of load on a shared
machine hits all of them alike; each first runs once untimed (first-touch pages, MPI's
connection set-up). The figure kept is the median of the repetitions.
"""
import statistics
import time

from mpi4py import MPI

SIZES_BYTES = [4 * 1024 * 4**step for step in range(7)]  # 4 KB, 16 KB, … 16 MB


def slowest_rank_seconds(communicator, run):
    """Seconds ``run()`` (one collective) takes, from a common start to the last rank's finish."""
    communicator.barrier()
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    return communicator.mpi.allreduce(elapsed, op=MPI.MAX)  # one float: pickled metadata is fine


def median_seconds(communicator, algorithms, run, repetitions):
    """{algorithm: median seconds of ``run(algorithm)``}, the algorithms interleaved."""
    for algorithm in algorithms:  # warm-up
        run(algorithm)
    samples = {algorithm: [] for algorithm in algorithms}
    for _ in range(repetitions):
        for algorithm in algorithms:
            samples[algorithm].append(slowest_rank_seconds(communicator, lambda a=algorithm: run(a)))
    return {algorithm: statistics.median(times) for algorithm, times in samples.items()}


def default_repetitions(nbytes):
    """More repetitions for small messages, whose times are short and noisy: 5 to 100."""
    return max(5, min(100, (32 * 1024**2) // nbytes))


def format_size(nbytes):
    return f"{nbytes // 1024**2} MB" if nbytes >= 1024**2 else f"{nbytes // 1024} KB"
