"""The README's main job against one process: wall time of the whole command, interleaved.

    python benchmarks/bench_main_job.py [--steps 1000] [--rounds 1] [--no-busy-poll] [--json FILE]

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
are taken within one run, rather than the seconds; the CPU ratio (8 ranks' CPU-seconds over one
process's) is the one that load changes least. ``--json FILE`` writes the ratios there too.
"""
import argparse
import json
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
    parser.add_argument("--json", default=None, help="also write the ratios to this file")
    parser.add_argument("--no-busy-poll", action="store_true", help="leave out the busy-polling MPICH job")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        train = [sys.executable, "-m", "minipar", "train", "--steps", str(arguments.steps), "--out", out]
        jobs = {
            "one process": (train, {"OMP_NUM_THREADS": "1"}),
            "8 ranks (minipar's MPICH settings)": ([find_mpiexec(), "-n", "8", *train, *LAYOUT], {}),
            "8 ranks, busy-polling MPICH": ([find_mpiexec(), "-n", "8", *train, *LAYOUT], BUSY_POLL),
        }
        if arguments.no_busy_poll:
            del jobs["8 ranks, busy-polling MPICH"]
        times = {name: [] for name in jobs}
        for _ in range(arguments.rounds):
            for name, (command, environment) in jobs.items():
                times[name].append(wall_seconds(command, environment))
    single = min(wall for wall, _ in times["one process"])
    single_cpu = min(cpu for _, cpu in times["one process"])
    cores = os.cpu_count()
    print(f"{arguments.steps} steps on {cores} cores, best of {arguments.rounds} interleaved rounds; CPU: the "
          f"processes' user + system seconds, CPU/{cores} the least wall time that work allows here")
    figures = {}
    for name, runs in times.items():
        wall, cpu = min(wall for wall, _ in runs), min(cpu for _, cpu in runs)
        print(f"  {name:36s} {wall:8.1f} s wall  {wall / single:5.2f}x one process   CPU {cpu:7.1f} s "
              f"= {cpu / single_cpu:5.2f}x one process's   CPU/{cores} = {cpu / cores / single:4.2f}x one process")
        if name != "one process":
            short = "8 ranks busy-poll" if "busy" in name else "8 ranks"
            figures[f"main job {short} CPU / 1 process"] = cpu / single_cpu
            figures[f"main job {short} wall / 1 process"] = wall / single
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
