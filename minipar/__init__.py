"""minipar: learn and check how large language models are trained in parallel.

Importing minipar does no work: no signal is blocked, no thread started, no variable set.
Process-wide settings (one BLAS thread per rank, MPICH's wait, the Ctrl-C watcher) are made in
one place, ``minipar.job.start_process``, which the command line (``python -m minipar``) and the
test harness (``python -m minipar.testing``) call first; a script of your own run under mpiexec
calls it first too (docs/design.md).
"""
__version__ = "0.1.0"
