"""`course check` and `course grade`: start the MPI job, print what it found, keep the score.

``check`` launches ``mpiexec -n <world_size> python -m minipar.course.runner`` in the
student's directory (so ``import minipar`` is the student's copy), prints each entry as its
result files complete, and, if a job ends early (a stuck or failed rank made it abort),
starts a new job from the entry after. A backstop kills a job that outlives every limit.

``grade`` does the same for a class, one exercise at a time: for each student and each
exercise it lays only that exercise's functions over a fresh copy of the teacher's tree
(``overlay.py``: the grader, the tests and every other exercise stay the teacher's, so an
unstarted exercise never zeroes another), checks it, and writes one CSV row per student
(per exercise: pass / fail / hang / error, the score and the weight in minutes; the weighted
score; the student's commit and the date) and one log per student.
"""
import csv
import datetime
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from minipar.course.checking import CHECK_LIMIT, entries, limit_of
from minipar.course.registry import EXERCISES, checks_of, exercise_named
from minipar.course.report import Compactor, entry_kind, entry_lines, entry_outcome
from minipar.course.runner import abort_file, read_entry

STARTUP_ALLOWANCE = 60.0   # seconds for mpiexec and the imports on a loaded machine, before any limit counts


@dataclass
class CheckResult:
    name: str
    passed: int
    total: int
    lines: list = field(default_factory=list)
    kinds: list = field(default_factory=list)   # per entry: pass, fail, error, hang, skip

    @property
    def score_line(self):
        return f"{self.passed}/{self.total} checks passed"

    @property
    def status(self):
        """The exercise's one word: pass, else hang, error or fail (the worst seen, in that order)."""
        if self.total and self.passed == self.total:
            return "pass"
        for kind in ("hang", "error", "fail"):
            if kind in self.kinds:
                return kind
        return "fail"


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
    said = [line.strip() for line in tail if line.strip() and not line.lstrip().startswith(("/", "python("))
            and "(+0x" not in line]
    telling = [line for line in said if any(word in line for word in ("Assertion failed", "Fatal error", "truncated",
                                                                      "Error", "error"))]
    shown = telling[:1] + said[-2:] if telling else said[-3:]
    reason = f"before the job ended (exit code {returncode}); its last output: {(' | '.join(shown) or 'none')[-600:]}"
    if any("unpack" in line or "Message truncated" in line for line in said):
        reason += (" — a message arrived in a buffer of another size or type: every message must be received "
                   "into a buffer of its own dtype and length (the buffer's dtype, one block)")
    abort_file(result_dir, index).write_text(json.dumps({"missing": missing, "limit": limit, "reason": reason,
                                                         "crashed": True}))


def _ended_the_job(result_dir, index, items, world):
    """Entry ``index`` hung, or failed while ranks still waited, so its job was ended."""
    if index < 0 or not abort_file(result_dir, index).exists():
        return False
    return entry_kind(result_dir, index, items[index][2], world) in ("hang", "error", "fail")


def _not_run(result_dir, index, items, world, limit):
    """Entry ``index`` is the check that just ended its job, on more ranks: recorded as the same outcome
    without running it (another wait would only say the same, and a class's grading would pay it for
    every size)."""
    before = json.loads(abort_file(result_dir, index - 1).read_text())
    kind = before.get("kind") or entry_kind(result_dir, index - 1, items[index - 1][2], world)
    reason = (before["reason"] if before["reason"].startswith("not run")
              else f"not run: the same check ended its job with fewer ranks ({items[index - 1][0]}, above)")
    abort_file(result_dir, index).write_text(json.dumps({"missing": [], "limit": limit, "reason": reason,
                                                         "kind": kind}))


HANGS_BEFORE_STOPPING = 2   # checks of one exercise that may hang before the rest is not run


def _hung_checks(result_dir, printed, items, world):
    """The distinct checks (not sizes) among the first ``printed`` entries that ended as a hang."""
    return {id(items[index][1]) for index in range(printed)
            if entry_kind(result_dir, index, items[index][2], world) == "hang"}


def _not_run_after_hangs(result_dir, index, items, world, limit, hung):
    """Entry ``index`` recorded as a hang without running it: ``hung`` checks have hung already, and each
    more would cost the limit and a new job (a class's grading would pay it for every student)."""
    reason = (f"not run: {hung} checks of this exercise hung already (above), and each would wait "
              f"{limit_of(items[index][1], limit):g} s again; make those finish first")
    abort_file(result_dir, index).write_text(json.dumps({"missing": [], "limit": limit, "reason": reason,
                                                         "kind": "hang"}))


def check(name, directory=".", limit=CHECK_LIMIT, out=print):
    """Grade exercise ``name`` in ``directory``; prints as it goes through ``out``; returns a CheckResult.

    One mpiexec job runs the checks in turn; a job that ends early (a crash, a hang killed at the
    limit) is followed by a new one for the entries after the one that ended it."""
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
        result_dir, start = Path(scratch), 0

        def report(index):
            for line in compact(entry_lines(result_dir, index, items, world)):
                emit(line)

        while start < len(items):
            printed, returncode, tail = _run_job(name, directory, items, world, result_dir, limit, start, report)
            if printed < len(items):
                printed = _close_ended_job(result_dir, items, world, limit, start, printed, returncode, tail, report)
            start = printed
        kinds = [entry_kind(result_dir, index, size, world) or "hang" for index, (_, _, size) in enumerate(items)]
        passed = sum(1 for index, (_, _, size) in enumerate(items)
                     if (entry_outcome(result_dir, index, size, world) or ("",))[0] == "pass")
    result = CheckResult(name, passed, len(items), lines, kinds)
    emit(result.score_line)
    return result


def _run_job(name, directory, items, world, result_dir, limit, start, report):
    """One mpiexec job for the entries from ``start``, each reported as its result appears; returns
    (how many entries are reported, the job's exit code, the last 300 lines of its log)."""
    from minipar.testing import _kill_job

    printed = start
    with open(result_dir / f"job{start}.log", "w+") as log:
        process = _launch(name, directory, world, result_dir, limit, start, log)
        backstop = time.monotonic() + STARTUP_ALLOWANCE + (limit + 15) * (len(items) - start)
        try:
            while True:
                finished = process.poll() is not None
                while printed < len(items) and entry_outcome(result_dir, printed, items[printed][2], world):
                    report(printed)
                    printed += 1
                if finished:
                    break
                if time.monotonic() > backstop:
                    _kill_job(process)
                time.sleep(0.1)
        finally:   # Ctrl-C, or a closed pipe: the job runs in its own session, so end it here
            if process.poll() is None:
                _kill_job(process)
        log.seek(0)
        tail = log.read().strip().splitlines()[-300:]
    return printed, process.returncode, tail


def _close_ended_job(result_dir, items, world, limit, start, printed, returncode, tail, report):
    """Record what a job that ended at entry ``printed`` leaves: the entry that ended it (unless it
    recorded its own abort), the same check at more ranks (it would end the job too), and the rest
    of the exercise once it has hung HANGS_BEFORE_STOPPING times. Returns where the next job starts."""
    if not any(abort_file(result_dir, index).exists() for index in range(start, printed)):
        _record_crash(result_dir, printed, items, world, limit, returncode, tail)
        report(printed)
        printed += 1
    while printed < len(items) and _ended_the_job(result_dir, printed - 1, items, world) \
            and items[printed][1] is items[printed - 1][1]:
        _not_run(result_dir, printed, items, world, limit)
        report(printed)
        printed += 1
    hung = len(_hung_checks(result_dir, printed, items, world))
    while hung >= HANGS_BEFORE_STOPPING and printed < len(items):   # a whole check stays within a minute
        _not_run_after_hangs(result_dir, printed, items, world, limit, hung)
        report(printed)
        printed += 1
    return printed


def check_overlaid(name, student_dir, limit=CHECK_LIMIT, out=print, reference=None):
    """Check exercise ``name`` with only its functions taken from ``student_dir`` (the rest: the reference)."""
    from minipar.course.overlay import overlay_exercise
    from minipar.course.student import copy_reference_tree, reference_root

    with tempfile.TemporaryDirectory(prefix="minipar-grade-") as scratch:
        tree = Path(scratch) / "tree"
        copy_reference_tree(reference or reference_root(), tree)
        overlay_exercise(exercise_named(name), student_dir, tree)
        return check(name, tree, limit, out=out)


def _commit_of(directory):
    """The student's commit (``+changes`` when the work tree differs from it), or "" without git."""
    if not (Path(directory) / ".git").exists():
        return ""
    head = subprocess.run(["git", "-C", str(directory), "rev-parse", "--short=12", "HEAD"], check=False,
                          capture_output=True, text=True)
    if head.returncode != 0:
        return ""
    dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                           check=False, capture_output=True, text=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def grade(student_dirs, csv_path, limit=CHECK_LIMIT, out=print, names=None):
    """Check every exercise for every student, one exercise at a time; one CSV row and one log per student.

    Columns: student, commit, date, then per exercise NAME (pass/fail/hang/error), NAME score (the
    fraction $f_e$ of its checks passed) and NAME weight (its minutes $w_e$), then score: the weighted
    percentage $100 · Σ_e w_e f_e / Σ_e w_e$ over the exercises $e$. Logs go to
    ``<csv stem>-logs/<student>.log`` next to the CSV.
    """
    names = names or [exercise.name for exercise in EXERCISES]
    exercises = [exercise_named(name) for name in names]
    csv_path = Path(csv_path)
    logs = csv_path.parent / f"{csv_path.stem}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for student_dir in student_dirs:
        if not Path(student_dir).is_dir():
            raise FileNotFoundError(f"no student directory {student_dir}")
        log_lines = []

        def say(line, log_lines=log_lines):
            log_lines.append(line)
            out("   " + line)

        out(f"== {student_dir}")
        row = {"student": str(student_dir), "commit": _commit_of(student_dir),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        weighted = 0.0
        for exercise in exercises:
            result = check_overlaid(exercise.name, student_dir, limit, out=say)
            fraction = result.passed / result.total if result.total else 0.0
            row[exercise.name] = result.status
            row[f"{exercise.name} score"] = f"{fraction:.3f}"
            row[f"{exercise.name} weight"] = exercise.minutes
            weighted += exercise.minutes * fraction
        row["score"] = f"{100 * weighted / sum(exercise.minutes for exercise in exercises):.1f}"
        name = Path(student_dir).resolve().name or "student"
        log = logs / f"{name}.log"
        if any(row.get("log") == str(log) for row in rows):   # two folders of the same name
            log = logs / f"{len(rows) + 1:02d}-{name}.log"
        log.write_text(f"{student_dir} at commit {row['commit'] or '(no git)'}, graded {row['date']}\n"
                       + "\n".join(log_lines) + "\n")
        row["log"] = str(log)
        rows.append(row)
    columns = ["student", "commit", "date"]
    for name in names:
        columns += [name, f"{name} score", f"{name} weight"]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*columns, "score", "log"])
        writer.writeheader()
        writer.writerows(rows)
    out(f"wrote {csv_path}: {len(rows)} student{'s' if len(rows) != 1 else ''}, logs in {logs}")
    return rows
