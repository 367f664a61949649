"""Do waiting ranks steal the working rank's core? One rank computes while the others wait.

    python benchmarks/bench_oversubscription.py [--ranks 8] [--work 0.5]

Launches ``mpiexec -n ranks`` once per MPICH setting below (the last: the rank imports minipar,
which sets them itself when it finds more ranks than cores). In each job rank 0 runs a fixed
piece of pure-Python work while every other rank waits for it (in MPI_Recv, then MPI_Barrier).
Printed per setting: rank 0's wall time for the work, and the CPU seconds the whole job used.
With busy-polling waiters on fewer cores than ranks, the work takes longer and the waiters burn
CPU; a setting that makes them sleep gives rank 0 its core back.

The settings are MPICH control variables read at MPI_Init (``mpivars`` lists them all):
  MPIR_CVAR_CH4_PROGRESS_THROTTLE=1   the ch4 progress loop calls usleep(1) after
                                      MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT polls
                                      (default 4096) that found nothing to do
  MPIR_CVAR_POLLS_BEFORE_YIELD=N      how many polls between yields of the busy-wait loop
The timings are wall clock on a possibly shared machine: compare settings within one run.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

SETTINGS = {  # name: (environment, import minipar before mpi4py in the rank)
    "default (busy-poll)": ({}, False),
    "THROTTLE": ({"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1"}, False),
    "THROTTLE + HEAVY_YIELD": ({"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}, False),
    "THROTTLE + HEAVY_YIELD, count 64": ({"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
                                          "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "64"}, False),
    "set by `import minipar` in the rank": ({}, True),
}


def rank_main(work_seconds, via_minipar):
    if via_minipar:
        import minipar  # noqa: F401  (sets the variables itself when ranks outnumber cores)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.rank == 0:
        started, total, n = time.perf_counter(), 0, 0
        while n < int(work_seconds * 4e6):  # about work_seconds of one free core
            total += n * n
            n += 1
        elapsed = time.perf_counter() - started
        for peer in range(1, world.size):
            world.send(None, peer)
    else:
        world.recv(source=0)
    world.Barrier()
    if world.rank == 0:
        print(json.dumps({"work_seconds": elapsed}))


def launch(ranks, work, variables, via_minipar):
    from minipar.testing import find_mpiexec

    environment = {name: value for name, value in os.environ.items() if not name.startswith("MPIR_CVAR_")}
    environment.update(variables, OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([find_mpiexec(), "-n", str(ranks), sys.executable, __file__, "--rank", str(work)]
                            + (["--via-minipar"] if via_minipar else []),
                            env=environment, capture_output=True, text=True, timeout=300, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(result.stdout.strip().splitlines()[-1])["work_seconds"], cpu, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--work", type=float, default=0.5, help="seconds of work on one free core")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--via-minipar", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.rank is not None:
        return rank_main(arguments.rank, arguments.via_minipar)
    sys.path.append(os.path.join(os.path.dirname(__file__), ".."))
    print(f"{arguments.ranks} ranks on {os.cpu_count()} cores; rank 0 works, the others wait "
          f"(best of {arguments.rounds} interleaved rounds)")
    results = {name: [] for name in SETTINGS}
    for _ in range(arguments.rounds):
        for name, (variables, via_minipar) in SETTINGS.items():
            results[name].append(launch(arguments.ranks, arguments.work, variables, via_minipar))
    print(f"{'setting':36s} {'rank 0 work (s)':>16s} {'job CPU (s)':>12s} {'job wall (s)':>13s}")
    for name, runs in results.items():
        work, cpu, wall = min(runs)
        print(f"{name:36s} {work:16.2f} {cpu:12.2f} {wall:13.2f}")


if __name__ == "__main__":
    main()
