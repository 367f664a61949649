"""Where each rank's CPU time goes: every rank of a job under cProfile, timed by its own CPU clock.

    mpiexec -n 8 python benchmarks/profile_ranks.py --out prof -- -m minipar train --steps 50 --dp 2 ...
    python benchmarks/profile_ranks.py --out prof -- -m minipar train --steps 50     # one process
    python benchmarks/profile_ranks.py --summary prof
    python benchmarks/profile_ranks.py --areas prof/rank0.prof     # any cProfile file: own time per area

Each process runs the command (``-m module ...`` or ``script.py ...``) under cProfile with the
process's CPU clock as the timer, so time a rank spends descheduled on a shared machine, or asleep
in MPI's throttled wait (minipar/_threads.py), costs nothing, and a busy-polling wait costs the
CPU it burns. It writes ``<out>/rank<R>.prof`` and ``<out>/rank<R>.json`` (CPU seconds before the
profiler started, and in all). ``--summary`` splits each rank's CPU into parts that do not overlap:

  start-up   the interpreter before the profiler, and every import (below importlib's
             _find_and_load, wherever it happens; MPI_Init runs inside mpi4py's import)
  MPI        inside mpi4py's calls (sending, receiving, waiting): cProfile cannot see into mpi4py's
             Cython methods, so this is the own time of minipar/comm's functions, which make
             those calls, bookkeeping included; a call made from elsewhere counts where it is made
  steps      below ``train_step`` (forward, backward, optimizer), less its MPI and imports
  evaluate   below ``evaluate`` (rank 0's evaluation), less its MPI and imports
  save       below ``save`` (the checkpoint), less its MPI and imports
  other      the rest: parsing, checks, building the model, the data, the profiler's own time

``--areas FILE`` reads any cProfile file (also one written with ``python -m cProfile -o``) and
gives each area of minipar its share of the own time: the engine (tensor.py), the ops' bodies,
C calls (NumPy's functions, builtins), modules, the optimizer, communication and the rest.

cProfile's own overhead inflates the Python-heavy parts; compare parts and ranks, not seconds
against an unprofiled run.
"""
import argparse
import json
import os
import sys
import time

START = time.process_time()  # the interpreter's start-up, before this line, is not in the profile


def rank_of_process():
    """This process's rank as the MPI launcher says (MPICH's Hydra, Open MPI), 0 without one."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def profile(out, command):
    import cProfile
    import runpy

    os.makedirs(out, exist_ok=True)
    rank = rank_of_process()
    module = command[1] if command[0] == "-m" else None
    sys.argv = command[1:] if module else command
    if not module:
        sys.path[0] = os.path.dirname(os.path.abspath(command[0]))
    profiler = cProfile.Profile(time.process_time)
    started = time.process_time()
    code = 0
    try:
        profiler.enable()
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(command[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    finally:
        profiler.disable()
        profiler.dump_stats(os.path.join(out, f"rank{rank}.prof"))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump({"before_profile": started, "total": time.process_time()}, handle)
    return code


def share_below(stats, outer):
    """``share(key)``: the fraction of function ``key``'s cumulative time spent inside a call of a
    function that ``outer(file, name)`` picks. cProfile records each caller -> callee edge's time, so
    the first level is exact; deeper, a function's time is split between its callers in proportion
    to what each edge took (gprof's assumption). A cycle contributes nothing."""
    memo = {}

    def share(key, visiting=frozenset()):
        if outer(key[0], key[2]):
            return 1.0
        if key in memo:
            return memo[key]
        if key in visiting or key not in stats.stats:
            return 0.0
        cumulative, callers = stats.stats[key][3], stats.stats[key][4]
        inside = sum(edge[3] * share(caller, visiting | {key}) for caller, edge in callers.items())
        memo[key] = min(1.0, inside / cumulative) if cumulative > 0 else 0.0
        return memo[key]

    return share


PARTS = ["start-up", "MPI", "steps", "evaluate", "save", "other"]


def parts(stats, before_profile, total):
    """One rank's CPU seconds in the parts of the module docstring. The cumulative times of the
    imports, ``train_step``, ``evaluate`` and ``save`` are exact (cProfile counts a recursive function's
    outermost calls); only the MPI calls and the imports inside the last three are split by
    ``share_below``'s rule."""
    def named(wanted):
        return lambda file, name: name == wanted and file.endswith(".py")

    def cumulative(matches):
        return sum(entry[3] for (file, _, name), entry in stats.stats.items() if matches(file, name))

    def is_import(file, name):
        return name == "_find_and_load"

    # mpi4py's methods are Cython functions, which cProfile does not see: the time inside them is
    # the own time of the Python function that calls them, in minipar's comm package.
    mpi_calls = [key for key in stats.stats if f"minipar{os.sep}comm{os.sep}" in key[0]
                 or (key[0] == "~" and "mpi4py" in key[2])]
    imports = [key for key in stats.stats if is_import(key[0], key[2])]
    result = {"start-up": before_profile + cumulative(is_import),
              "MPI": sum(stats.stats[key][2] for key in mpi_calls)}
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    for part, function in (("steps", "train_step"), ("evaluate", "evaluate"), ("save", "save")):
        share = share_below(stats, named(function))
        result[part] = (cumulative(named(function)) - sum(stats.stats[key][2] * share(key) for key in mpi_calls)
                        - sum(stats.stats[key][3] * share(key) for key in imports))
    result["other"] = total - sum(result.values())
    return result


def summary(out):
    import glob
    import pstats

    ranks = sorted(glob.glob(os.path.join(out, "rank*.prof")), key=lambda path: int(path.split("rank")[-1][:-5]))
    names = PARTS
    print(f"CPU seconds per rank (profiled with cProfile on the CPU clock; {out})")
    print(f"{'rank':>4s} {'total':>7s} " + " ".join(f"{name:>9s}" for name in names))
    sums = dict.fromkeys(["total", *names], 0.0)
    for path in ranks:
        times = json.load(open(path[:-5] + ".json"))
        split = parts(pstats.Stats(path), times["before_profile"], times["total"])
        sums["total"] += times["total"]
        for name in names:
            sums[name] += split[name]
        rank = path.split("rank")[-1][:-5]
        print(f"{rank:>4s} {times['total']:7.2f} " + " ".join(f"{split[name]:9.2f}" for name in names))
    print(f"{'all':>4s} {sums['total']:7.2f} " + " ".join(f"{sums[name]:9.2f}" for name in names))


AREAS = (("minipar/tensor.py", "engine: minipar/tensor.py (apply, Tensor, backward, the walk, leaves)"),
         ("minipar/grad_mode.py", "engine: minipar/grad_mode.py"),
         ("minipar/ops/", "ops: forward and backward bodies, with their array operators"),
         ("minipar/nn/", "modules: minipar/nn"), ("minipar/optim.py", "optimizer"),
         ("minipar/comm/", "communication: minipar/comm, MPI calls included"),
         ("minipar/parallel/", "parallel modes: minipar/parallel"), ("minipar/", "the rest of minipar"),
         ("numpy/", "NumPy's Python layer (mean, sum wrappers)"))


def areas(path):
    """Each area's share of the own (exclusive) time in the cProfile file ``path``."""
    import collections
    import pstats

    shares = collections.Counter()
    for (file, _, _), entry in pstats.Stats(path).stats.items():
        where = "C calls: NumPy's functions, builtins" if file == "~" else next(
            (label for key, label in AREAS if key.replace("/", os.sep) in file), "other Python")
        shares[where] += entry[2]
    total = sum(shares.values())
    print(f"own time by area in {path} ({total:.2f} s)")
    for label, seconds in shares.most_common():
        print(f"  {label:72s} {seconds:8.3f} s  {100 * seconds / total:5.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s --out DIR -- (-m MODULE | SCRIPT) [ARGS ...] | --summary DIR | --areas FILE")
    parser.add_argument("--out", help="folder for rank<R>.prof and rank<R>.json")
    parser.add_argument("--summary", help="print the per-rank split of a folder written before")
    parser.add_argument("--areas", help="print the share of each area of minipar in one cProfile file")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    arguments = parser.parse_args()
    if arguments.summary:
        return summary(arguments.summary)
    if arguments.areas:
        return areas(arguments.areas)
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    if not arguments.out or not command:
        parser.error("give --out DIR and the command after --")
    return profile(arguments.out, command)


if __name__ == "__main__":
    sys.exit(main())
