"""Process-wide settings, made in one place (``start_process``): Ctrl-C held for the watcher, one BLAS
thread per rank, and MPI ranks that sleep while they wait when ranks share cores.

``start_process`` is the first statement of ``python -m minipar`` and ``python -m minipar.testing``
(and what a script of your own run under mpiexec calls first). Under an MPI launcher it blocks
SIGINT at once, before anything else is imported, so that a Ctrl-C arriving while the rank starts
waits, pending, for the watcher thread (minipar/ctrl_c.py) instead of raising KeyboardInterrupt in
the middle of an import; then it sets the variables below; then it starts the watcher; then it
starts MPI (``minipar.ctrl_c.start_mpi``: MPI_Init with the GIL released, so that the watcher can
act while a rank waits in MPI_Init for partners). Without a launcher it does nothing. This module
imports only ``os`` and ``signal``.

The thread variables must be set before NumPy loads, because BLAS reads them only once, at load
time. Importing this module changes nothing. Ranks that share cores and each
start a full BLAS thread pool fight over the cores and run many times slower.

MPICH's ranks busy-poll while they wait for a message, which is the fastest way to wait
when every rank has a core of its own and the worst when ranks outnumber cores: the
waiting ranks burn the cores that the working ones need. ``OVERSUBSCRIBED_MPICH`` turns on
ch4's progress throttle (after MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT empty
polls, default 4096, the loop yields) and makes that yield a real sleep rather than
sched_yield (MPIR_CVAR_ENABLE_HEAVY_YIELD). MPICH reads its variables in MPI_Init, and
``start_process`` runs before the command line imports mpi4py, so a rank that finds more ranks on its
node than cores sets them for itself. On a cluster with one rank per core, leave them
unset: sleeping adds latency to every wait that outlasts the polls.

A user who sets any of these variables explicitly keeps their choice.
"""
import os
import signal

_LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")

_LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")

launched_by_mpi = any(name in os.environ for name in _LAUNCHER_SIZE_VARIABLES)  # a reading, no setting

# MPICH control variables for more ranks than cores (see the docstring); benchmarks/bench_oversubscription.py
# measures their effect.
OVERSUBSCRIBED_MPICH = {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ranks_on_this_node():
    """Ranks on this node as the launcher says (Hydra: MPI_LOCALNRANKS; Open MPI), else 0."""
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def launcher_rank_and_size():
    """(rank, size) as the launcher's variables say, before MPI is initialised; (0, 1) without a launcher."""
    def first(names, default):
        for name in names:
            if os.environ.get(name, "").isdigit():
                return int(os.environ[name])
        return default

    return first(_LAUNCHER_RANK_VARIABLES, 0), first(_LAUNCHER_SIZE_VARIABLES, 1)


def set_thread_environment():
    """Under an MPI launcher: one BLAS thread per rank, and MPICH's sleeping wait when ranks outnumber cores.

    Effective only before NumPy (BLAS) and mpi4py (MPI_Init) are imported; a variable the user set is kept.
    """
    if not launched_by_mpi:
        return
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    if _ranks_on_this_node() > _available_cores():
        for name, value in OVERSUBSCRIBED_MPICH.items():
            os.environ.setdefault(name, value)


def start_process():
    """The one place for process-wide settings (see the docstring); call it first. Calling it again does nothing.

    Launched as ``mpiexec -n 8 env --block-signal=INT python -m minipar ...``, a rank starts with SIGINT
    already blocked, so a Ctrl-C during Python's own start-up (before this line can run) waits too; blocking
    it again here changes nothing. Without a launcher nothing watches for it, so an inherited block is lifted
    and a pending Ctrl-C is Python's KeyboardInterrupt, as usual.
    """
    if not launched_by_mpi:
        if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a Ctrl-C from now on waits for the watcher
    set_thread_environment()
    from minipar.ctrl_c import start_mpi, watch_ctrl_c

    watch_ctrl_c()
    start_mpi()  # MPI_Init with the GIL released, so the watcher can act while a rank waits in it
