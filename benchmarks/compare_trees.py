"""Run one benchmark on two versions of minipar in turn, and print its figures side by side.

    python benchmarks/compare_trees.py --before a3ba610 [--after REV] [--rounds 3] [--python PY] \\
        -- benchmarks/bench_mlp.py --rounds 5 --steps 5

The benchmark script is always this tree's; the ``minipar`` it imports is each version's in turn:
``--before`` is a commit, exported with ``git archive`` into a temporary folder (no worktree, no
branch), ``--after`` another commit or, by default, this working tree with its uncommitted changes.
Each run gets ``PYTHONPATH`` and the working directory of its version (``python -m minipar``
imports from the working directory first). The runs alternate, before, after, before, after …,
``rounds`` times, so a busy spell on a shared machine falls on both versions alike.

Each run writes its figures with ``--json FILE``, which bench_mlp.py, bench_step.py,
bench_main_job.py and bench_course_checks.py accept. The table gives each figure's range over
the rounds for either version and the ratio of the medians, after / before.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(revision, folder):
    """The files of commit ``revision`` in ``folder``, as ``git archive`` gives them."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def run_once(python, tree, command, json_path):
    """The benchmark's figures with ``tree``'s minipar; its own output goes to the terminal."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([python, *command, "--json", str(json_path)], cwd=tree, env=environment, check=True)
    return json.loads(Path(json_path).read_text())


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


def table(labels, figures):
    """One row per measure: its range over the rounds for each version, and after/before of the medians."""
    measures = list(dict.fromkeys(name for runs in figures.values() for run in runs for name in run))
    width = max(len(name) for name in measures) if measures else 10
    header = f"{'measure':{width}s}  " + "  ".join(f"{label:>19s}" for label in labels) + "  after/before"
    lines = [header, "-" * len(header)]
    for name in measures:
        cells, medians = [], []
        for label in labels:
            values = [run[name] for run in figures[label] if name in run]
            medians.append(median(values) if values else None)
            cells.append(f"{min(values):.3g}-{max(values):.3g}" if values else "(none)")
        ratio = f"{medians[1] / medians[0]:12.2f}" if None not in medians and medians[0] else ""
        lines.append(f"{name:{width}s}  " + "  ".join(f"{cell:>19s}" for cell in cells) + "  " + ratio)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s --before REV [options] -- SCRIPT [ARGS ...]")
    parser.add_argument("--before", required=True, help="the commit to compare against (git archive)")
    parser.add_argument("--after", default=None, help="another commit (default: this working tree, as it is)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each version, alternating")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run the benchmark with")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS ...] (the script: this tree's)")
    arguments = parser.parse_args()
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    if not command:
        parser.error("give the benchmark after --, e.g. -- benchmarks/bench_mlp.py --rounds 5 --steps 5")
    labels, figures = compare(arguments.before, arguments.after, arguments.rounds, arguments.python, command)
    shown = " ".join([os.path.relpath(command[0]), *command[1:]])
    print(f"\n{shown}: {arguments.rounds} alternating runs of each version (range over the runs)")
    print(table(labels, figures))


def compare(before, after, rounds, python, command):
    """(labels, {label: [figures of each run]}) of ``command`` run on ``before`` and ``after`` in turn."""
    command = [os.path.abspath(command[0]), *command[1:]]  # the runs start in each version's folder
    with tempfile.TemporaryDirectory(prefix="minipar-compare-") as scratch:
        scratch = Path(scratch)
        trees = {f"before {before}": export(before, scratch / "before"),
                 f"after {after or '(this tree)'}": export(after, scratch / "after") if after else ROOT}
        figures = {label: [] for label in trees}
        for round_ in range(rounds):
            for label, tree in trees.items():
                print(f"== {label}, round {round_ + 1} of {rounds}: {os.path.basename(command[0])}", flush=True)
                figures[label].append(run_once(python, tree, command, scratch / "figures.json"))
    return list(trees), figures


if __name__ == "__main__":
    main()
