"""minipar: learn and check how large language models are trained in parallel."""
from minipar import _threads  # noqa: F401  (must run before NumPy is imported)
from minipar.job import watch_ctrl_c

watch_ctrl_c()  # under mpiexec, before any other thread starts: Ctrl-C ends the whole job (minipar/job.py)

__version__ = "0.1.0"
