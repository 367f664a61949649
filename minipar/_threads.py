"""One BLAS thread per rank, and MPI ranks that sleep while they wait, when ranks share cores.

Imported first by ``minipar/__init__.py``, before NumPy loads, because BLAS
reads these variables only once, at load time. Ranks that share cores and each
start a full BLAS thread pool fight over the cores and run many times slower.

MPICH's ranks busy-poll while they wait for a message, which is the fastest way to wait
when every rank has a core of its own and the worst when ranks outnumber cores: the
waiting ranks burn the cores that the working ones need. ``OVERSUBSCRIBED_MPICH`` turns on
ch4's progress throttle (after MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT empty
polls, default 4096, the loop yields) and makes that yield a real sleep rather than
sched_yield (MPIR_CVAR_ENABLE_HEAVY_YIELD). MPICH reads its variables in MPI_Init, and this
module runs before any minipar code imports mpi4py, so a rank that finds more ranks on its
node than cores sets them for itself. On a cluster with one rank per core, leave them
unset: sleeping adds latency to every wait that outlasts the polls.

A user who sets any of these variables explicitly keeps their choice.
"""
import os

_LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")

launched_by_mpi = any(name in os.environ for name in _LAUNCHER_SIZE_VARIABLES)

if launched_by_mpi:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ.setdefault(name, "1")

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


if launched_by_mpi and _ranks_on_this_node() > _available_cores():
    for name, value in OVERSUBSCRIBED_MPICH.items():
        os.environ.setdefault(name, value)
