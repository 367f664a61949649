"""The README's main job against one process: wall time of the whole command, interleaved.

    python benchmarks/bench_main_job.py [--steps 1000] [--rounds 1]

Runs, in turn, ``rounds`` times:
  one process       python -m minipar train --steps S
  8 ranks           mpiexec -n 8 python -m minipar train --dp 2 --tp 2 --pp 2 --zero 1 --microbatches 4
                    --steps S, once as minipar runs it (ranks that find more ranks than cores sleep
                    while they wait: minipar/_threads.py) and once with MPICH's busy-polling forced
                    back on (MPIR_CVAR_CH4_PROGRESS_THROTTLE=0, MPIR_CVAR_ENABLE_HEAVY_YIELD=0)
and prints each command's best wall time (start-up, evaluation and the checkpoint included), its
ratio to the one-process run, and the CPU seconds all its processes used: on C cores no schedule
can finish that work in less than CPU / C, which bounds what any MPI setting can win. Both jobs
train the same model on the same global batches. On a shared machine compare the ratios, which
are taken within one run, rather than the seconds.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, ".."))
from minipar.testing import find_mpiexec  # noqa: E402

LAYOUT = ["--dp", "2", "--tp", "2", "--pp", "2", "--zero", "1", "--microbatches", "4"]
BUSY_POLL = {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "0", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "0"}


def wall_seconds(command, extra_environment):
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MPIR_CVAR_")}
    environment.update(extra_environment)
    environment.setdefault("PYTHONPATH", os.path.join(HERE, ".."))
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=3600)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        train = [sys.executable, "-m", "minipar", "train", "--steps", str(arguments.steps), "--out", out]
        jobs = {
            "one process": (train, {"OMP_NUM_THREADS": "1"}),
            "8 ranks (minipar's MPICH settings)": ([find_mpiexec(), "-n", "8", *train, *LAYOUT], {}),
            "8 ranks, busy-polling MPICH": ([find_mpiexec(), "-n", "8", *train, *LAYOUT], BUSY_POLL),
        }
        times = {name: [] for name in jobs}
        for _ in range(arguments.rounds):
            for name, (command, environment) in jobs.items():
                times[name].append(wall_seconds(command, environment))
    single = min(times["one process"])[0]
    cores = os.cpu_count()
    print(f"{arguments.steps} steps on {cores} cores, best of {arguments.rounds} interleaved rounds; CPU: the "
          f"processes' user + system seconds, CPU/{cores} the least wall time that work allows here")
    for name, runs in times.items():
        wall, cpu = min(runs)
        print(f"  {name:36s} {wall:8.1f} s wall  {wall / single:5.2f}x one process   CPU {cpu:7.1f} s  "
              f"CPU/{cores} = {cpu / cores / single:4.2f}x one process")


if __name__ == "__main__":
    main()
