"""How long a student waits for a passing `course check`: every exercise on the reference tree.

    python benchmarks/bench_course_checks.py [--only ring_allreduce,zero_1] [--rounds 1] [--json FILE]

Runs ``python -m minipar course check NAME`` for each exercise, in the checkout whose ``minipar``
this script imports (``PYTHONPATH`` picks it), where every solution is in place, so every check
should pass. Printed per exercise: the ranks it starts, the wall seconds the student waits (mpiexec,
every rank's imports and the checks; the best of ``rounds``), and the CPU seconds all its processes
used: on C cores no schedule finishes that work in less than CPU / C, whatever the load. Then the
slowest. The goal of issue 28 is 10 s on 2 cores. ``--json FILE`` writes the figures there too
(benchmarks/compare_trees.py reads it).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # PYTHONPATH, if set, picks it


def timed_check(name, root):
    """(wall seconds, CPU seconds of every process, passed) of one `course check NAME` in ``root``."""
    environment = {**os.environ, "PYTHONPATH": str(root)}
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "minipar", "course", "check", name, "--dir", str(root)],
                            cwd=root, env=environment, capture_output=True, text=True, timeout=900, check=False)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode:
        print(f"{name} did not pass:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}", flush=True)
    return wall, cpu, result.returncode == 0


def main():
    import minipar
    from minipar.course.registry import EXERCISES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated exercise names (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each check; the best is shown")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    arguments = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(minipar.__file__)))
    names = arguments.only.split(",") if arguments.only else [exercise.name for exercise in EXERCISES]
    ranks = {exercise.name: exercise.world_size for exercise in EXERCISES}
    print(f"course check of every exercise in {root}, {os.cpu_count()} cores, best of {arguments.rounds}")
    print(f"{'exercise':24s} {'ranks':>5s} {'wall s':>7s} {'CPU s':>7s}  passed")
    figures, walls = {}, {}
    for name in names:
        runs = [timed_check(name, root) for _ in range(arguments.rounds)]
        wall, cpu, passed = min(w for w, _, _ in runs), min(c for _, c, _ in runs), all(p for _, _, p in runs)
        walls[name] = wall
        figures[f"course check {name} wall s"] = wall
        figures[f"course check {name} CPU s"] = cpu
        print(f"{name:24s} {ranks.get(name, '?'):>5} {wall:7.1f} {cpu:7.1f}  {'yes' if passed else 'NO'}", flush=True)
    slowest = max(walls, key=walls.get)
    figures["course check slowest wall s"] = walls[slowest]
    print(f"slowest: {slowest}, {walls[slowest]:.1f} s wall (goal: 10 s on 2 cores)")
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
