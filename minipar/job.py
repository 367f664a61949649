"""How a minipar job ends: every rank gone within seconds, and the cause said once.

An MPI job has two kinds of failure, and each needs its own ending.

* **Found together.** Checks that every rank makes (the command line, the configuration, the
  data, the checkpoint, the output folder) run locally and then meet in *one* collective,
  ``agree``: an allgather of each rank's error message (or None) and a fingerprint of what it
  is about to do. Every rank then knows who failed and why, and whether all ranks were started
  with the same configuration, and raises the same ``JobError``; rank 0 prints it and every rank
  exits with status 2. Nobody waits for anybody: all of them leave through the same door.
  Errors raised after a collective in the same way (a failed checkpoint save, a NaN loss, which
  every rank sees) are marked ``on_every_rank`` and end the same way.
* **Found alone.** Anything else (an exception on one rank mid-step, Ctrl-C) cannot be
  agreed on: the partners are blocked inside an MPI call and will never hear of it. The rank
  that knows prints one message naming itself and the cause, waits until the launcher has read
  it (``flush_to_launcher``), and calls ``MPI_Abort(MPI_COMM_WORLD)``, which makes the launcher
  kill every rank (MPI-4.0 section 11.8.1; MPICH's hydra does it at once). When every rank fails
  alike, rank 0 speaks first and the others, which wait 1.5 s before speaking, are ended before
  they repeat it.

Ctrl-C under mpiexec is minipar/ctrl_c.py: a watcher thread that ends the job whatever it is doing
at that moment, started by ``start_process`` (minipar/_threads.py), the one place where
process-wide settings are made.

``guard_job`` installs a ``sys.excepthook`` that aborts, so a user's own script that builds a
``Trainer`` gets the same ending for an uncaught exception (as ``python -m mpi4py script.py``
would give). ``run_job`` is the CLI's wrapper around a command; there a ``SystemExit`` raised on
one rank (``sys.exit`` in user code) ends the job too, naming the rank and the code, instead of
leaving that rank waiting in MPI_Finalize for partners that wait for it.

A rank killed outright (``kill -9``, the kernel's out-of-memory killer) can say nothing, and
neither can the others: MPICH's hydra sends SIGKILL to every other rank at once, and its banner
("BAD TERMINATION ... PID n") names one rank's PID, not always the killed one's (measured with
MPICH 4/hydra 5.0.2). So ``record_ranks`` writes each rank's PID and host at start
(``train`` puts it in ``OUT/ranks.json``): the kernel's log (``dmesg``: "Killed process n") names
the PID, and that file names the rank (docs/checkpoints.md, "When a rank is killed").
"""
import hashlib
import json
import os
import signal
import stat
import sys
import threading
import time
import traceback

from minipar._threads import start_process  # noqa: F401  (re-exported: minipar.job.start_process)
from minipar.errors import CheckpointError, ConfigError, DataError, JobError

USER_ERRORS = (ConfigError, DataError, CheckpointError, JobError)
EXIT_USER_ERROR, EXIT_CRASH, EXIT_INTERRUPTED = 2, 1, 130
_SPEAK_DELAY = 1.5  # seconds a rank other than 0 waits before speaking and aborting (see the docstring)
_DRAIN_LIMIT = 2.0  # seconds a rank about to abort waits for the launcher to read what it wrote
_guarded = {}  # the Ctrl-C watcher thread (minipar/ctrl_c.py) and the world whose job is guarded, once per process


def job_world():
    """mpi4py's COMM_WORLD when started by an MPI launcher, else None (one process, no MPI needed)."""
    from minipar._threads import launched_by_mpi

    if not launched_by_mpi:
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def on_every_rank(error):
    """Mark ``error`` as raised alike on every rank (after a collective), so no abort is needed."""
    error.on_every_rank = True
    return error


def exit_code_of(error):
    """The exit status a SystemExit asks for (sys.exit's rules: None is 0, an int itself, anything else 1)."""
    code = error.code
    return 0 if code is None else code if isinstance(code, int) else 1


def describe(error):
    """One line: a user error's own sentence, anything else with its type."""
    if isinstance(error, USER_ERRORS):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(error, SystemExit):
        return f"sys.exit({error.code!r}) was called (SystemExit, exit code {exit_code_of(error)})"
    return f"{type(error).__name__}: {error}"


def _ranks(ranks):
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


# ---- found together --------------------------------------------------------------------------
def fingerprint(*things):
    """A short hash of JSON-able things, to compare what ranks are about to do."""
    text = json.dumps(things, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def agree(world, check):
    """Run ``check()`` here (no communication inside!), then one allgather: every rank learns every outcome.

    ``check`` returns ``(result, fingerprint)``; the fingerprints of all ranks must match (a rank
    started with other arguments or other data is an error too). Returns ``result``, or raises the
    same JobError on every rank, naming the ranks that failed and the first cause of each kind.
    """
    message, result, mark = None, None, None
    try:
        result, mark = check()
    except Exception as error:  # noqa: BLE001 - every failure is reported below, on every rank
        message = describe(error)
    if world is None or world.Get_size() == 1:
        if message:
            raise on_every_rank(JobError(message))
        return result
    outcomes = world.allgather((message, mark))  # small metadata: the one pickled collective
    failed = {}
    for rank, (text, _) in enumerate(outcomes):
        if text:
            failed.setdefault(text, []).append(rank)
    if failed:
        size = world.Get_size()
        if len(failed) == 1 and len(next(iter(failed.values()))) == size:
            raise on_every_rank(JobError(next(iter(failed))))  # the same on all ranks: say it plainly
        parts = [f"{_ranks(ranks)} of {size}: {text}" for text, ranks in failed.items()]
        raise on_every_rank(JobError("on " + "; on ".join(parts)))
    differ = [rank for rank, (_, other) in enumerate(outcomes) if other != outcomes[0][1]]
    if differ:
        raise on_every_rank(JobError(
            f"{_ranks(differ)} of {world.Get_size()} were started with another configuration or other data than "
            "rank 0 (different command lines or files?); every rank must run the same job"))
    return result


# ---- found alone -----------------------------------------------------------------------------
def _unread_bytes(stream):
    """Bytes written to ``stream`` that its reader has not taken yet, when it is a pipe; else 0."""
    try:
        import fcntl  # POSIX only, like the launchers this is for
        import termios

        descriptor = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(descriptor).st_mode):
            return 0  # a file or a terminal has the bytes once write() returns
        count = bytearray(4)
        fcntl.ioctl(descriptor, termios.FIONREAD, count)  # Linux answers for either end of a pipe
        return int.from_bytes(count, sys.byteorder)
    except (AttributeError, ImportError, OSError, ValueError):
        return 0


def flush_to_launcher(limit=_DRAIN_LIMIT):
    """Flush stdout and stderr and wait (at most ``limit`` s) until the launcher has read them.

    Under ``mpiexec`` a rank's output goes through a pipe to the launcher's proxy. ``MPI_Abort``
    makes the launcher kill the job at once, and whatever still sits in the pipe is lost: the
    job then fails with no word of why (a CI run showed exactly that). So a rank about to abort
    waits until both pipes are empty; the proxy forwards what it read before it hears the abort.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and (_unread_bytes(sys.stdout) or _unread_bytes(sys.stderr)):
        time.sleep(0.01)
    time.sleep(0.1)  # a moment more for the proxy to pass on what it read (a terminal or file: no wait above)


def abort_job(world, error, code=None):
    """Say ``error`` once, naming this rank, and end every rank of ``world``. Does not return."""
    rank, size = world.Get_rank(), world.Get_size()
    if rank != 0:
        time.sleep(_SPEAK_DELAY)  # if rank 0 failed alike, it ends the job before this rank repeats it
    if code is None:
        code = EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else (
            EXIT_USER_ERROR if isinstance(error, USER_ERRORS) else EXIT_CRASH)
    # A fresh line first: rank 0's progress bar may be half-way along the terminal's line.
    lines = f"\nerror on rank {rank} of {size}: {describe(error)}; ending the job\n"
    if not isinstance(error, (KeyboardInterrupt, *USER_ERRORS)):  # a bug or a sys.exit: where it happened
        lines += "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        sys.stdout.flush()
        sys.stderr.write(lines)
        flush_to_launcher()
    finally:
        world.Abort(code)  # asks the launcher to kill every rank; MPICH's Abort may return before it has
        os._exit(code)  # so this rank leaves by itself, running no more Python (and no MPI_Finalize)


def record_ranks(world, path=None):
    """Every rank's (host, PID), gathered on every rank (collective); rank 0 writes them to ``path`` as JSON.

    A rank killed outright cannot name itself (see the docstring); this record maps the PID that the
    kernel's log names to the rank.
    """
    import socket

    ranks = world.allgather({"host": socket.gethostname(), "pid": os.getpid()})  # small metadata
    if path is not None and world.Get_rank() == 0:
        from minipar.checkpoint import write_json_atomic

        write_json_atomic(path, {"ranks": [dict(rank=rank, **entry) for rank, entry in enumerate(ranks)]})
    return ranks


def guard_job(world):
    """Under MPI with more than one rank: Ctrl-C and uncaught exceptions end every rank (see the docstring)."""
    if world is None or world.Get_size() == 1 or "world" in _guarded:
        return
    if threading.current_thread() is not threading.main_thread():
        return
    _guarded["world"] = world
    from minipar.ctrl_c import watch_ctrl_c

    watch_ctrl_c()  # a no-op when start_process already did it
    # A thread started before the watcher (mpi4py imported first) may still take SIGINT; Python
    # then runs this handler in the main thread, as soon as that one is back in Python.
    signal.signal(signal.SIGINT, lambda number, frame: abort_job(world, KeyboardInterrupt(), EXIT_INTERRUPTED))
    previous = sys.excepthook

    def abort_on_uncaught(kind, error, trace):
        if issubclass(kind, SystemExit):
            return previous(kind, error, trace)
        abort_job(world, error.with_traceback(trace))

    sys.excepthook = abort_on_uncaught


def run_job(body):
    """``body()`` as a job: returns its exit status; any failure ends every rank, said once."""
    world = job_world()
    guard_job(world)
    rank = world.Get_rank() if world is not None else 0
    try:
        return body()
    except SystemExit as error:
        if getattr(error, "on_every_rank", False) or world is None or world.Get_size() == 1:
            raise  # --help, a usage error: every rank leaves alike
        abort_job(world, error, exit_code_of(error) or EXIT_CRASH)  # sys.exit on one rank: does not return
    except BaseException as error:  # noqa: BLE001 - every failure ends the job, one way or the other
        if not (getattr(error, "on_every_rank", False) or world is None or world.Get_size() == 1):
            abort_job(world, error)  # found alone: does not return
        if isinstance(error, KeyboardInterrupt):
            code, line = EXIT_INTERRUPTED, "interrupted (Ctrl-C); stopping"
        elif isinstance(error, USER_ERRORS):
            code, line = EXIT_USER_ERROR, f"error: {describe(error)}"
        else:
            code, line = EXIT_CRASH, "".join(traceback.format_exception(type(error), error, error.__traceback__))
        if rank == 0:  # every rank knows; one says it
            sys.stdout.flush()
            print(line.rstrip("\n"), file=sys.stderr, flush=True)
        return code
