# python benchmarks/bench_grading.py --students 30 --out grading.json
"""How long `course grade` takes for a whole class: the teacher's guide quotes this.

A class is made up, deterministically (``--seed``), of student folders as a real class hands them in:
each exercise of each student is, independently, done (the reference), not started (the stub the
student version has), or wrong (one of the corpus's wrong solutions for that exercise, minipar/course/
planted/), with the probabilities ``--done`` and ``--wrong``. Then the class is graded once, as a
teacher would (``python -m minipar course grade DIRS --csv FILE``, run as a subprocess so its wall time
and the CPU time of every MPI rank it starts are both counted), and the result is written as JSON:
wall seconds, CPU seconds of the grader and its children, and per-status counts from the CSV.

Teacher-only, like the corpus: nothing here is in the student version.
"""
import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def make_student(folder, states, wrong_choice):
    """A student's folder: the reference tree with each exercise done, stubbed or replaced by a wrong one."""
    from minipar.course.planted import apply
    from minipar.course.registry import exercise_named
    from minipar.course.student import copy_reference_tree, reference_root, stub_package_file

    copy_reference_tree(reference_root(), folder)
    stubbed = [name for name, state in states.items() if state == "not started"]
    for name in wrong_choice:
        apply(wrong_choice[name], folder)
    for path in sorted({path for name in stubbed for path in exercise_named(name).paths}):
        target = folder / path
        text, _ = stub_package_file(target.read_text(), path, only=set(stubbed))
        target.write_text(text)


def make_class(root, students, seed, done, wrong):
    """``students`` folders under ``root``; returns {folder name: {exercise: state}}."""
    from minipar.course.planted import PLANTED
    from minipar.course.registry import EXERCISES

    rng = random.Random(seed)
    wrong_by_exercise = {exercise.name: [p for p in PLANTED if p.exercise == exercise.name] for exercise in EXERCISES}
    plan = {}
    for number in range(students):
        states, choice = {}, {}
        for exercise in EXERCISES:
            draw = rng.random()
            state = "done" if draw < done else "wrong" if draw < done + wrong else "not started"
            if state == "wrong":
                choice[exercise.name] = rng.choice(wrong_by_exercise[exercise.name])
            states[exercise.name] = state
        name = f"student_{number:02d}"
        make_student(root / name, states, choice)
        plan[name] = {exercise: (f"wrong: {choice[exercise].name}" if state == "wrong" else state)
                      for exercise, state in states.items()}
    return plan


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_grading.py")
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--done", type=float, default=0.6, help="chance an exercise is done (right)")
    parser.add_argument("--wrong", type=float, default=0.2, help="chance it is wrong (else not started)")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minipar-class-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        plan = make_class(root, arguments.students, arguments.seed, arguments.done, arguments.wrong)
        print(f"{arguments.students} student folders made in {time.perf_counter() - started:.0f} s", flush=True)
        folders = [str(root / name) for name in sorted(plan)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        finished = subprocess.run([sys.executable, "-m", "minipar", "course", "grade", *folders,
                                   "--csv", str(root / "grades.csv")], env=os.environ.copy())
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(root / "grades.csv") as handle:
            rows = list(csv.DictReader(handle))
    statuses = Counter(row[name] for row in rows for name in plan[Path(row["student"]).name])
    planned = Counter(state.split(":")[0] for states in plan.values() for state in states.values())
    figures = {"students": arguments.students, "exercises_planned": dict(planned), "statuses": dict(statuses),
               "wall_seconds": round(wall, 1), "cpu_seconds": round((after.ru_utime - before.ru_utime)
                                                                   + (after.ru_stime - before.ru_stime), 1),
               "grade_exit_code": finished.returncode, "load_average_after": os.getloadavg()[0],
               "cores": len(os.sched_getaffinity(0)), "seed": arguments.seed}
    print(json.dumps(figures, indent=1))
    if arguments.out:
        Path(arguments.out).write_text(json.dumps({**figures, "plan": plan}, indent=1))
    return 0 if rows else 1  # the grader exits 1 when any student failed; the run itself succeeded


if __name__ == "__main__":
    sys.exit(main())
