"""The one place that chooses the array library.

Every array operation in minipar goes through ``xp``:

    from minipar.backend import xp
    y = xp.tanh(x)

NumPy is the only backend today. The CuPy switch is meant to be this one line
(or the environment variable ``MINIPAR_BACKEND=cupy``): nothing else in the
package imports NumPy for compute.

Two helpers sit beside ``xp`` because MPI and files need host memory:
``to_host`` turns any backend array into a NumPy array, ``from_host`` the
reverse. With NumPy both are no-ops.
"""
import ctypes
import os
import sys

import numpy as _host  # host memory for MPI buffers and files; never for compute

BACKEND_NAME = os.environ.get("MINIPAR_BACKEND", "numpy")

if BACKEND_NAME == "numpy":
    import numpy as xp
elif BACKEND_NAME == "cupy":  # pragma: no cover - needs a GPU
    import cupy as xp
else:
    raise ValueError(f"MINIPAR_BACKEND must be 'numpy' or 'cupy', got {BACKEND_NAME!r}")


def reuse_freed_memory():
    """Let glibc's malloc recycle large blocks instead of returning them to the kernel.

    A process-wide setting, so importing minipar never makes it: programs call it once at
    start-up (``python -m minipar`` and the benchmarks do; a library user may too).

    Every op makes fresh arrays of activation size (a few MB). By default glibc maps each
    such block from the kernel and unmaps it when freed, so every op pays page faults on
    memory it just had: measured here, a training step of the benchmark GPT took 129 ms
    with that and 106 ms without (benchmarks/bench_step.py). Raising the thresholds keeps
    freed blocks in the heap for reuse. Linux with glibc and the NumPy backend only;
    elsewhere nothing changes.
    """
    if BACKEND_NAME != "numpy" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it alone
        return
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in malloc.h
    mallopt(mmap_threshold, 1 << 30)
    mallopt(trim_threshold, 1 << 30)


def to_host(array):
    """A NumPy array holding the same values (copies off the GPU under CuPy)."""
    if BACKEND_NAME == "cupy":  # pragma: no cover
        return xp.asnumpy(array)
    return _host.asarray(array)


def from_host(array):
    """A backend array holding the same values (copies onto the GPU under CuPy)."""
    if BACKEND_NAME == "cupy":  # pragma: no cover
        return xp.asarray(array)
    return array


# float32 unless a run asks for float64 (the equivalence tests do).
_default_dtype = xp.float32


def default_dtype():
    return _default_dtype


def set_default_dtype(dtype):
    """Choose the dtype new tensors and parameters get: float32 or float64."""
    global _default_dtype
    dtype = xp.dtype(dtype).type
    if dtype not in (xp.float32, xp.float64):
        raise ValueError(f"default dtype must be float32 or float64, got {dtype}")
    _default_dtype = dtype


def host_rng(seed):
    """A NumPy random generator on the host: parameters and batches are drawn here and copied
    to the backend, so a run gives the same numbers under NumPy and CuPy."""
    return _host.random.default_rng(seed)
