"""One BLAS thread per rank when minipar runs under an MPI launcher.

Imported first by ``minipar/__init__.py``, before NumPy loads, because BLAS
reads these variables only once, at load time. Ranks that share cores and each
start a full BLAS thread pool fight over the cores and run many times slower.
A user who sets the variables explicitly keeps their choice.
"""
import os

_LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")

launched_by_mpi = any(name in os.environ for name in _LAUNCHER_SIZE_VARIABLES)

if launched_by_mpi:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ.setdefault(name, "1")
