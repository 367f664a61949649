"""What every rank of a `course check` job runs.

    mpiexec -n 8 python -m minipar.course.runner NAME RESULT_DIR [--limit S] [--start K] [--report]

For each graded entry (a check on N ranks) every rank joins ``MPI.COMM_WORLD.Split``: ranks
0 … N−1 get a fresh communicator of N ranks and run the check body on it, the others sit the
entry out. Each rank then writes its outcome to ``RESULT_DIR/<entry>.<rank>.json`` and waits
for every other rank's file before the next entry, so the files are the whole record and the
job never needs a collective that a broken rank could block.

A run never hangs. A rank gives up on an entry when its time limit passes (a watchdog thread,
so even a rank stuck inside ``Recv`` gives up), or a few seconds after another rank reported
a failure while some ranks have not finished (they may wait for that rank's messages). The
first rank to give up writes ``<entry>.abort.json`` naming the ranks that did not finish and
ends the job with ``MPI.COMM_WORLD.Abort``. The parent (``grader.py``) then reads the files
and starts a new job from the next entry.

The files assume ranks share a file system, as they do on one machine.
"""
import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from minipar.course.checking import CHECK_LIMIT

GRACE_AFTER_FAILURE = 3.0  # seconds the others get to finish after a rank failed or raised
POLL = 0.02


def entry_file(result_dir, index, rank):
    return Path(result_dir) / f"{index:03d}.{rank}.json"


def abort_file(result_dir, index):
    return Path(result_dir) / f"{index:03d}.abort.json"


def _write(path, record):
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)  # readers never see half a file


_COURSE = Path(__file__).resolve().parent          # the grader's own files: never "where" the student is
_ROOT = _COURSE.parent.parent                       # the checkout whose minipar this job imported


def _in_student_code(filename):
    """A frame in the imported minipar package but not in the grader (whatever the folders are called)."""
    path = Path(filename).resolve()
    return path.is_relative_to(_ROOT / "minipar") and not path.is_relative_to(_COURSE)


def _where(error):
    """``path:line in function`` of the innermost frame in minipar outside the course package."""
    frames = traceback.extract_tb(error.__traceback__)
    inside = [frame for frame in frames if _in_student_code(frame.filename)]
    frame = (inside or frames or [None])[-1]
    if frame is None:
        return ""
    return f" (at {_short(frame.filename)}:{frame.lineno} in {frame.name})"


def run_entry(check, comm):
    """Run one check body on this rank; the outcome as a small dict."""
    from minipar.course.checking import CheckFailure

    started = time.perf_counter()
    try:
        check.body(comm)
        outcome = {"status": "pass"}
    except CheckFailure as failure:
        outcome = {"status": "fail", "message": str(failure)}
    except Exception as error:  # noqa: BLE001 - the student's code may raise anything; report it in one line
        lines = str(error).strip().splitlines() or [""]
        # MPI errors carry a whole error stack; its last line says what went wrong.
        outcome = {"status": "error", "message": f"raised {type(error).__name__}: {lines[-1].strip()}{_where(error)}"}
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


def read_entry(result_dir, index, world_size, known=None):
    """``{rank: outcome}`` of the files present so far. ``known``: outcomes read before, kept as
    they are (a file is written once, whole, by ``os.replace``), so that a rank waiting for the
    others looks only for the files still missing; reading every file on every poll was a third
    of a waiting rank's CPU time (benchmarks/profile_ranks.py on `course check data_parallel`)."""
    outcomes = dict(known) if known else {}
    for rank in range(world_size):
        if rank in outcomes:
            continue
        path = entry_file(result_dir, index, rank)
        if path.exists():
            outcomes[rank] = json.loads(path.read_text())
    return outcomes


def stuck_file(result_dir, index, rank):
    return Path(result_dir) / f"{index:03d}.{rank}.stuck"


def giving_up_file(result_dir, index):
    return Path(result_dir) / f"{index:03d}.giving-up"


def _short(filename):
    """``minipar/comm/collectives.py`` for a file of the imported package, else the path as it is."""
    path = Path(filename).resolve()
    return path.relative_to(_ROOT).as_posix() if path.is_relative_to(_ROOT) else filename


def where_main_thread_is(exercise_paths=()):
    """``path:line in function: source`` where the main thread waits: the innermost frame in the
    exercise's files, else the innermost in minipar outside the course package."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    stack = traceback.extract_stack(frame) if frame is not None else []
    inside = [entry for entry in stack if _in_student_code(entry.filename)]
    preferred = [entry for entry in inside if _short(entry.filename) in exercise_paths]
    if not inside:   # in the grader itself: this rank is done with the student's code and waits for the others
        return "the grader's own code, past the exercise's (waiting for the other ranks)"
    entry = (preferred or inside)[-1]
    return f"{_short(entry.filename)}:{entry.lineno} in {entry.name}: {(entry.line or '').strip()}"


def give_up(result_dir, index, world_size, participants, limit, reason, report_lines=None):
    """Record which ranks did not finish entry ``index`` and end the job (first caller only)."""
    from mpi4py import MPI

    from minipar.job import flush_to_launcher

    giving_up_file(result_dir, index).touch()   # the stuck ranks' watchdogs write where they are stuck
    time.sleep(1.0)
    try:
        lock = os.open(Path(result_dir) / f"{index:03d}.abort.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(lock)
    except FileExistsError:  # another rank is already ending the job
        time.sleep(10)
        MPI.COMM_WORLD.Abort(1)
        return
    missing = sorted(set(participants) - set(read_entry(result_dir, index, world_size)))
    _write(abort_file(result_dir, index), {"missing": missing, "limit": limit, "reason": reason})
    if report_lines is not None:
        report_lines(index)
    flush_to_launcher()  # the launcher kills the job on Abort; what it has not read yet is lost
    MPI.COMM_WORLD.Abort(1)


class Watchdog:
    """Calls ``on_expiry(index)`` if entry ``index`` is still current ``limit`` seconds after it began."""

    def __init__(self, on_expiry, result_dir, rank, exercise_paths):
        self.on_expiry, self.current, self.lock = on_expiry, None, threading.Lock()
        self.result_dir, self.rank, self.exercise_paths = result_dir, rank, exercise_paths
        self.deadline = None
        threading.Thread(target=self._watch, daemon=True).start()

    def begin(self, index, limit):
        with self.lock:
            self.current, self.deadline = index, time.monotonic() + limit

    def end(self):
        with self.lock:
            self.current = None

    def _watch(self):
        noted = None
        while True:
            time.sleep(0.1)
            with self.lock:
                expired = self.current is not None and time.monotonic() > self.deadline
                index = self.current
            if index is not None and index != noted and giving_up_file(self.result_dir, index).exists():
                noted = index   # another rank is ending the job while this one is still inside the entry
                stuck_file(self.result_dir, index, self.rank).write_text(where_main_thread_is(self.exercise_paths))
            if expired:
                stuck_file(self.result_dir, index, self.rank).write_text(where_main_thread_is(self.exercise_paths))
                self.on_expiry(index)
                return


def run(name, result_dir, limit, start=0, report=False):
    """Run exercise ``name``'s entries from ``start`` on; returns (passed, total) on every rank."""
    from mpi4py import MPI

    from minipar.course.checking import entries, limit_of
    from minipar.course.registry import checks_of, exercise_named
    from minipar.course.report import Compactor, entry_lines, score_line

    world = MPI.COMM_WORLD
    rank, world_size = world.Get_rank(), world.Get_size()
    exercise = exercise_named(name)
    items = entries(checks_of(exercise))
    say = print if report and rank == 0 else (lambda *args, **kwargs: None)

    def report_abort(index):
        if report:  # the rank that ends the job prints the end of the report
            for line in entry_lines(result_dir, index, items, world_size):
                print(line)
            for label, _, _ in items[index + 1:]:
                print(f"NOT RUN  {label} (the job was ended by the failure above; `course check` without "
                      "mpirun starts a new job for the rest)")
            print(score_line(result_dir, items, world_size))

    participants_of, compact = {}, Compactor()
    watchdog = Watchdog(lambda index: give_up(result_dir, index, world_size, participants_of[index],
                                              limit_of(items[index][1], limit), "time limit", report_abort),
                        result_dir, rank, exercise.paths)
    passed = 0
    for index in range(start, len(items)):
        _, check, size = items[index]
        participants_of[index] = list(range(min(size, world_size)))
        watchdog.begin(index, limit_of(check, limit))
        if size > world_size:
            outcome = {"status": "skipped", "message": f"needs {size} ranks, this job has {world_size}"}
        else:
            color = 0 if rank < size else MPI.UNDEFINED
            comm = world.Split(color, rank)
            outcome = {"status": "idle"} if comm == MPI.COMM_NULL else run_entry(check, comm)
            if outcome["status"] == "pass" and comm != MPI.COMM_NULL:
                comm.Free()
        _write(entry_file(result_dir, index, rank), outcome)
        error_seen, outcomes = None, {}
        while True:
            outcomes = read_entry(result_dir, index, world_size, outcomes)
            if len(outcomes) == world_size:
                break
            if error_seen is None and any(o["status"] in ("error", "fail") for o in outcomes.values()):
                error_seen = time.monotonic()
            if error_seen is not None and time.monotonic() - error_seen > GRACE_AFTER_FAILURE:
                give_up(result_dir, index, world_size, participants_of[index], limit_of(check, limit),
                        "a rank failed while others waited", report_abort)
            time.sleep(POLL)
        watchdog.end()
        for line in compact(entry_lines(result_dir, index, items, world_size)):
            say(line, flush=True)
        passed += all(o["status"] in ("pass", "idle") for o in outcomes.values())
    say(score_line(result_dir, items, world_size), flush=True)
    return passed, len(items)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minipar.course.runner")
    parser.add_argument("name")
    parser.add_argument("result_dir")
    parser.add_argument("--limit", type=float, default=CHECK_LIMIT)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--report", action="store_true")
    arguments = parser.parse_args(argv)
    run(arguments.name, arguments.result_dir, arguments.limit, arguments.start, arguments.report)


if __name__ == "__main__":
    main()
