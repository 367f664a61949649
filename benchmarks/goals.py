"""Every goal of issue 28, before and after, in one run: compare_trees.py over each goal's benchmark.

    python benchmarks/goals.py --before a3ba610 [--rounds 2] [--torch-python PY] [--only mlp,step,main,course]

For each goal its benchmark runs on the ``--before`` commit and on this working tree in turn,
``rounds`` times each (benchmarks/compare_trees.py), and one table gives each figure's range for
either version, its goal, and whether the after median meets it. On the idle 2-core machine,
with the sizes below and 2 rounds, it takes about a quarter of an hour: the MLP about 5 minutes,
the GPT step 2, the main job 2, the course checks 5. ``--torch-python``: an interpreter with PyTorch
and NumPy for the GPT step (without it the step is timed alone and has no ratio).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)

from compare_trees import compare, median  # noqa: E402

# goal name -> (benchmark command, {figure: the goal it is held to (at most)})
GOALS = {
    "mlp": (["bench_mlp.py", "--rounds", "5", "--steps", "5"],
            {**{f"MLP {config} minipar/peer": 1.1 for config in ("sequential", "gpipe2", "1f1b2", "gpipe4", "1f1b4")},
             **{f"MLP {config} minipar/peer": 1.2 for config in ("dp2", "dp4")},
             **{f"MLP {config} overlap/peer": 1.2 for config in ("dp2", "dp4")}}),
    "step": (["bench_step.py", "--threads", "1", "--steps", "10", "--rounds", "5"], {"GPT step minipar/torch": 1.0}),
    "main": (["bench_main_job.py", "--steps", "300", "--no-busy-poll"], {"main job 8 ranks CPU / 1 process": 3.0}),
    "course": (["bench_course_checks.py"], {"course check slowest wall s": 10.0}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--torch-python", default=sys.executable, help="the interpreter for bench_step.py")
    parser.add_argument("--only", default=",".join(GOALS), help="which goals: " + ",".join(GOALS))
    arguments = parser.parse_args()
    rows = []
    for name in arguments.only.split(","):
        command, targets = GOALS[name]
        python = arguments.torch_python if name == "step" else sys.executable
        labels, figures = compare(arguments.before, None, arguments.rounds, python,
                                  [os.path.join(HERE, command[0]), *command[1:]])
        for figure, goal in targets.items():
            ranges = []
            for label in labels:
                values = [run[figure] for run in figures[label] if figure in run]
                ranges.append((min(values), median(values), max(values)) if values else None)
            rows.append((figure, goal, *ranges))
    print(f"\nissue 28's goals, {arguments.rounds} alternating runs of each version; before {arguments.before}, "
          "after: this tree; range over the runs (median), and whether the after median meets the goal")
    width = max(len(row[0]) for row in rows)
    print(f"{'measure':{width}s}  {'goal':>6s}  {'before':>22s}  {'after':>22s}  met")

    def cell(values):
        return f"{values[0]:.3g}-{values[2]:.3g} ({values[1]:.3g})" if values else "(none)"

    for figure, goal, before, after in rows:
        met = "" if after is None else ("yes" if after[1] <= goal else "no")
        print(f"{figure:{width}s}  {goal:6.2f}  {cell(before):>22s}  {cell(after):>22s}  {met}")


if __name__ == "__main__":
    main()
