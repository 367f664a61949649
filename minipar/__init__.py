"""minipar: learn and check how large language models are trained in parallel.

Importing minipar does no work: no signal is blocked, no thread started, no variable set.
Process-wide settings (Ctrl-C held for the watcher, one BLAS thread per rank, MPICH's wait, the
watcher thread) are made in one place, ``start_process`` in minipar/_threads.py (also
``minipar.job.start_process``), which the command line (``python -m minipar``) and the test
harness (``python -m minipar.testing``) call as their first statement; a script of your own run
under mpiexec calls it first too.
"""
__version__ = "0.1.0"
