"""Ctrl-C under an MPI launcher: every rank gone within seconds, said once, whatever the job is doing.

Ctrl-C: MPICH's ``mpiexec`` forwards SIGINT to every rank, but Python only acts on a signal
between bytecodes, and a rank blocked in an MPI call never gets there (the job ran on,
untouchable, in minipar before this module). So under an MPI launcher ``watch_ctrl_c`` blocks
SIGINT before NumPy or MPI start threads of their own (a thread inherits its creator's mask, and
the kernel hands a process's signal to any thread that does not block it: MPICH's progress thread
took it and the main thread, stuck in a collective, never heard). One small thread then waits for
it with ``sigwait`` (mpi4py releases the GIL in blocking calls, so the thread runs) and ends the
job, whatever the job is doing at that moment:

* MPI running, several ranks: ``abort_job`` (one message, naming the rank, exit 130);
* MPI not running yet (still importing, or inside MPI_Init): the watcher waits for MPI_Init to
  finish (at most ``_START_WAIT``, 3 s; the main thread goes on meanwhile), then aborts as above.
  Ranks that simply left while a partner was inside MPI_Init made hydra's mpiexec (5.0.2) wait
  forever, after every rank had gone. For that wait to end, the watcher must be able to run while
  the main thread is inside MPI_Init, and mpi4py's MPI_Init holds the GIL (a thread that ticks
  every 0.1 s ticked twice in 2 s of it). So ``start_mpi`` calls MPI_Init_thread through ctypes,
  which releases the GIL for the call: when a partner died in Python's own start-up and never
  reaches MPI_Init, the others leave after 3 s instead of waiting in it forever, which is what
  left mpiexec hanging before (seen in 3 of 21 plain launches interrupted 0.25-0.4 s in);
* MPI never came up within that time, or has already ended (finalised): nothing to abort through,
  and nothing to wait for, since the launcher gave every rank the signal. Rank 0 says it once and
  every rank leaves at once with 130 (``_end_without_mpi``);
* one rank: a KeyboardInterrupt in the main thread, as Python would raise.

The watcher never dies: whatever goes wrong while it decides, the rank leaves with 130, because
a dead watcher would leave SIGINT blocked and the job deaf to every later Ctrl-C.

``start_process`` (minipar/_threads.py, also ``minipar.job.start_process``) is the one place
where process-wide settings are made: SIGINT blocked at once, one BLAS thread per rank and MPICH's
sleeping wait, then the watcher. ``python -m minipar`` calls it as its first statement,
``python -m minipar.testing`` likewise; importing minipar does nothing. A script of your own run
under mpiexec calls ``minipar.job.start_process()`` first.

Before that first statement, no code of minipar runs: Python installs its own SIGINT handler while
the interpreter starts, then imports ``site`` (every ``.pth`` file of the environment: an editable
install's finder imports pathlib and re), then runpy finds the module. A Ctrl-C in that window, the
first few tenths of a second of an 8-rank job on a busy machine, meets Python's handler on every rank
that is still there: each prints its own KeyboardInterrupt traceback (or "Fatal Python error:
init_import_site"), and nothing in Python can run earlier to prevent it. A signal mask, though,
survives ``exec``: launched as ``mpiexec -n 8 env --block-signal=INT python -m minipar ...`` (GNU
coreutils' ``env``, 8.31 or later), every rank starts with SIGINT blocked, Python's start-up never
sees the signal, and the watcher takes it as soon as it starts (tests/test_faults.py sweeps 0.1 to
2.0 s both ways; docs/checkpoints.md, "Ctrl-C while the ranks start").
"""
import _thread
import os
import signal
import sys
import threading
import time

from minipar.job import EXIT_INTERRUPTED, _guarded, abort_job, flush_to_launcher

_START_WAIT = 3.0  # seconds a rank interrupted while starting waits for MPI_Init before leaving without it


def _mpi_state():
    """("running", COMM_WORLD), ("ended", None) after MPI_Finalize, or ("not yet", None).

    mpi4py.MPI sits in sys.modules from the moment its import starts, so a Ctrl-C during that import
    finds a module without its functions yet (MPI_Init is under way): that is "not yet" too.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is None or not mpi.Is_initialized():
            return "not yet", None
        if mpi.Is_finalized():
            return "ended", None
        return "running", mpi.COMM_WORLD
    except AttributeError:  # half imported
        return "not yet", None


def _initialised_world():
    """COMM_WORLD once MPI_Init has run (and MPI_Finalize has not), else None."""
    return _mpi_state()[1]


def _end_without_mpi():
    """Ctrl-C while MPI is not running: rank 0 says it, every rank leaves now (the launcher signalled all)."""
    from minipar._threads import launcher_rank_and_size

    rank, size = launcher_rank_and_size()
    if rank == 0:
        sys.stderr.write(f"\ninterrupted (Ctrl-C) on rank 0 of {size} before MPI was running (or after it "
                         "ended); ending the job\n")
        flush_to_launcher(limit=0.5)
    os._exit(EXIT_INTERRUPTED)


def _on_ctrl_c():
    from minipar._threads import launcher_rank_and_size

    state, world = _mpi_state()
    if "world" in _guarded:
        state, world = "running", _guarded["world"]
    size = world.Get_size() if world is not None else launcher_rank_and_size()[1]
    if size == 1 and state == "running":
        _thread.interrupt_main()  # one process: a KeyboardInterrupt in the main thread, as usual
        return
    # Leaving while another rank is inside MPI_Init can leave hydra's mpiexec waiting forever (seen with
    # 5.0.2), so a rank still starting finishes MPI_Init first (the main thread goes on meanwhile).
    deadline = time.monotonic() + _START_WAIT
    while state == "not yet" and time.monotonic() < deadline:
        time.sleep(0.01)
        state, world = _mpi_state()
    if state == "running" and size > 1:
        abort_job(world, KeyboardInterrupt(), EXIT_INTERRUPTED)
    _end_without_mpi()


def _wait_for_ctrl_c():
    while True:
        signal.sigwait({signal.SIGINT})
        try:
            _on_ctrl_c()
        except BaseException:  # noqa: BLE001 - the watcher must not die and leave SIGINT blocked
            os._exit(EXIT_INTERRUPTED)


def start_mpi():
    """MPI_Init_thread (MPI_THREAD_MULTIPLE, as mpi4py asks by default) with the GIL released: see the docstring.

    ``start_process`` calls it last, under a launcher only. mpi4py is told not to initialise MPI itself
    (``mpi4py.rc.initialize``); ``atexit`` finalises it, as mpi4py would have (a rank that aborts leaves
    through ``os._exit`` and runs no ``atexit``). If the library's MPI_Init_thread cannot be reached
    through ctypes, mpi4py's own ``Init_thread`` does the same with the GIL held.
    """
    import atexit
    import ctypes

    import mpi4py

    mpi4py.rc.initialize = False
    from mpi4py import MPI

    if MPI.Is_initialized():
        return
    try:
        init_thread = ctypes.CDLL(MPI.__file__).MPI_Init_thread  # mpi4py's module resolves it from libmpi
    except (OSError, AttributeError):
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    else:
        init_thread.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        provided = ctypes.c_int(-1)
        if init_thread(None, None, MPI.THREAD_MULTIPLE, ctypes.byref(provided)) != 0:
            raise RuntimeError("MPI_Init_thread failed")
    atexit.register(lambda: MPI.Is_finalized() or MPI.Finalize())


def watch_ctrl_c():
    """Under an MPI launcher, from now on only the minipar-ctrl-c thread receives SIGINT (see the docstring).

    ``start_process`` calls it before NumPy and mpi4py are imported, so every thread started later
    (BLAS, MPI's progress thread, tqdm's monitor) inherits the blocked signal.
    """
    from minipar._threads import launched_by_mpi

    if not launched_by_mpi or "watcher" in _guarded or threading.current_thread() is not threading.main_thread():
        return
    _guarded["watcher"] = threading.Thread(target=_wait_for_ctrl_c, name="minipar-ctrl-c", daemon=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # first: the watcher inherits the mask sigwait needs
    _guarded["watcher"].start()
