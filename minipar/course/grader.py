"""`course check` and `course grade`: start the MPI job, print what it found, keep the score.

``check`` launches ``mpiexec -n <world_size> python -m minipar.course.runner`` in the
student's directory (so ``import minipar`` is the student's copy), prints each entry as its
result files complete, and, if a job ends early (a stuck or failed rank made it abort),
starts a new job from the entry after. A backstop kills a job that outlives every limit.

``grade`` does the same for a class: for each student directory it overlays the exercise
files onto a fresh copy of the teacher's tree (so the grader and tests are the teacher's,
whatever a student changed), checks every exercise, and writes one CSV row per student.
"""
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from minipar.course.checking import entries
from minipar.course.registry import EXERCISES, checks_of, exercise_named
from minipar.course.report import Compactor, entry_lines, entry_outcome
from minipar.course.runner import abort_file, read_entry

STARTUP_ALLOWANCE = 60.0   # seconds for mpiexec and the imports on a loaded machine, before any limit counts


@dataclass
class CheckResult:
    name: str
    passed: int
    total: int
    lines: list = field(default_factory=list)

    @property
    def score_line(self):
        return f"{self.passed}/{self.total} checks passed"


def _launch(name, directory, world_size, result_dir, limit, start, log):
    from minipar.testing import (
        _child_environment,
        _launcher_flags_and_environment,
        find_mpiexec,
    )

    mpiexec = find_mpiexec()
    environment = _child_environment()
    environment["PYTHONPATH"] = str(directory) + (":" + environment["PYTHONPATH"] if environment.get("PYTHONPATH")
                                                  else "")
    command = [mpiexec, *_launcher_flags_and_environment(mpiexec, environment), "-n", str(world_size),
               sys.executable, "-m", "minipar.course.runner", name, str(result_dir), "--limit", str(limit),
               "--start", str(start)]
    return subprocess.Popen(command, cwd=directory, env=environment, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _record_crash(result_dir, index, items, world, limit, returncode, tail):
    """The job died in entry ``index`` without a rank recording why (a crash, or the backstop's kill)."""
    participants = range(min(items[index][2], world))
    missing = sorted(set(participants) - set(read_entry(result_dir, index, world)))
    reason = f"before the job ended (exit code {returncode})"
    if not read_entry(result_dir, index, world):
        reason = reason[:-1] + f"; its last output: {(' | '.join(tail) or 'none')[-600:]})"
    abort_file(result_dir, index).write_text(json.dumps({"missing": missing, "limit": limit, "reason": reason}))


def check(name, directory=".", limit=60.0, out=print):
    """Grade exercise ``name`` in ``directory``; prints as it goes through ``out``; returns a CheckResult."""
    from minipar.testing import _kill_job

    exercise = exercise_named(name)
    directory = Path(directory).resolve()
    items = entries(checks_of(exercise))
    world = exercise.world_size
    lines, compact = [], Compactor()

    def emit(line):
        lines.append(line)
        out(line)

    emit(f"course check {name}: {len(items)} checks on mpiexec -n {world} in {directory} "
         f"(limit {limit:g} s per check; a rank still busy then counts as stuck)")
    with tempfile.TemporaryDirectory(prefix="minipar-course-") as scratch:
        result_dir, start, printed = Path(scratch), 0, 0
        while start < len(items):
            with open(result_dir / f"job{start}.log", "w+") as log:
                process = _launch(name, directory, world, result_dir, limit, start, log)
                backstop = time.monotonic() + STARTUP_ALLOWANCE + (limit + 15) * (len(items) - start)
                while True:
                    finished = process.poll() is not None
                    while printed < len(items) and entry_outcome(result_dir, printed, items[printed][2], world):
                        for line in compact(entry_lines(result_dir, printed, items, world)):
                            emit(line)
                        printed += 1
                    if finished:
                        break
                    if time.monotonic() > backstop:
                        _kill_job(process)
                    time.sleep(0.1)
                log.seek(0)
                tail = log.read().strip().splitlines()[-6:]
            if printed >= len(items):
                break
            if not any(abort_file(result_dir, index).exists() for index in range(start, printed)):
                _record_crash(result_dir, printed, items, world, limit, process.returncode, tail)
                for line in compact(entry_lines(result_dir, printed, items, world)):
                    emit(line)
                printed += 1
            start = printed  # a new job for the entries after the one that ended this job
        passed = sum(1 for index, (_, _, size) in enumerate(items)
                     if (entry_outcome(result_dir, index, size, world) or ("",))[0] == "pass")
    result = CheckResult(name, passed, len(items), lines)
    emit(result.score_line)
    return result


def _student_tree(reference_root, student_dir, destination):
    """The teacher's tree with the student's exercise files laid over it."""
    from minipar.course.student import copy_reference_tree

    copy_reference_tree(reference_root, destination)
    for path in sorted({path for exercise in EXERCISES for path in exercise.paths}):
        source = Path(student_dir) / path
        if source.exists():
            shutil.copyfile(source, destination / path)
    return destination


def grade(student_dirs, csv_path, limit=60.0, out=print, names=None):
    """Check every exercise for every student; one CSV row per student. Returns the rows."""
    from minipar.course.student import reference_root

    names = names or [exercise.name for exercise in EXERCISES]
    rows = []
    for student_dir in student_dirs:
        if not Path(student_dir).is_dir():
            raise FileNotFoundError(f"no student directory {student_dir}")
        with tempfile.TemporaryDirectory(prefix="minipar-grade-") as scratch:
            tree = _student_tree(reference_root(), student_dir, Path(scratch) / "tree")
            out(f"== {student_dir}")
            results = [check(name, tree, limit, out=lambda line: out("   " + line)) for name in names]
        row = {"student": str(student_dir)}
        for result in results:
            row[result.name] = f"{result.passed}/{result.total}"
        row["passed"] = sum(result.passed for result in results)
        row["total"] = sum(result.total for result in results)
        rows.append(row)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["student", *names, "passed", "total"])
        writer.writeheader()
        writer.writerows(rows)
    out(f"wrote {csv_path}: {len(rows)} student{'s' if len(rows) != 1 else ''}")
    return rows
