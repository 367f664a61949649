"""The one place that chooses the array library.

Every array operation in minipar goes through ``xp``:

    from minipar.backend import xp
    y = xp.tanh(x)

``MINIPAR_BACKEND`` (or ``python -m minipar train --backend ...``, which sets it before
anything imports this module) picks it, once per process:

- ``numpy`` (default): the CPU;
- ``cupy``: a GPU (``pip install "minipar[gpu]"``); docs/gpu.md says what moves where;
- ``devicesim``: ``minipar.devicesim``, a strict CPU stand-in for CuPy whose arrays refuse
  to turn into NumPy arrays implicitly, so tests catch what would break on a GPU.

Memory on the device and on the host are kept apart. MPI and files need host memory;
they get it only through the two named copies below, ``to_host`` and ``from_host``,
which count what they move (``copy_counts``). With NumPy both are free and count nothing.
"""
import ctypes
import os
import sys
from collections import Counter

import numpy as _host  # host memory for MPI buffers and files; never for compute

BACKEND_NAMES = ("numpy", "cupy", "devicesim")
BACKEND_NAME = os.environ.get("MINIPAR_BACKEND", "numpy")

if BACKEND_NAME == "numpy":
    import numpy as xp
elif BACKEND_NAME == "cupy":  # pragma: no cover - needs a GPU
    import cupy as xp
elif BACKEND_NAME == "devicesim":
    from minipar import devicesim as xp
else:
    raise ValueError(f"MINIPAR_BACKEND must be one of {', '.join(BACKEND_NAMES)}; got {BACKEND_NAME!r}")

ON_DEVICE = BACKEND_NAME != "numpy"  # arrays live apart from host memory


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


copy_counts = Counter()  # "to_host", "from_host" (calls) and "to_host_bytes", "from_host_bytes"


def reset_copy_counts():
    copy_counts.clear()


def _count(direction, nbytes):
    copy_counts[direction] += 1
    copy_counts[direction + "_bytes"] += int(nbytes)


def to_host(array, out=None):
    """A NumPy array holding the same values: a counted device-to-host copy on a device.

    ``out``: a preallocated NumPy array (pinned, for staging) to copy into and return.
    """
    if isinstance(array, _host.ndarray) or not ON_DEVICE:  # already host memory: nothing crosses
        if out is None:
            return _host.asarray(array)
        out[...] = array
        return out
    _count("to_host", array.nbytes)
    return xp.asnumpy(array) if out is None else array.get(out=out)


def from_host(array, out=None):
    """A backend array holding the same values: a counted host-to-device copy on a device.

    ``out``: a device array of the same dtype and shape to copy into and return.
    """
    if isinstance(array, xp.ndarray):  # already backend memory: nothing crosses
        if out is None:
            return array
        out[...] = array
        return out
    host = _host.asarray(array)
    if ON_DEVICE:
        _count("from_host", host.nbytes)
    if out is None:
        return xp.asarray(host)
    if ON_DEVICE:
        out.set(_host.ascontiguousarray(host))
    else:
        out[...] = host
    return out


def scalar_to_host(array):
    """A Python float from a one-element array (the loss): one counted copy on a device."""
    return float(to_host(array).reshape(()))


def empty_pinned(nbytes):
    """A host byte buffer for staging MPI messages: page-locked under CuPy, so copies to and
    from the device run at full speed; plain NumPy memory otherwise."""
    if BACKEND_NAME == "cupy":  # pragma: no cover
        import cupyx

        return cupyx.empty_pinned((nbytes,), dtype=_host.uint8)
    return _host.empty(nbytes, dtype=_host.uint8)


def synchronize():
    """Wait until the device has finished the work queued so far (before MPI reads its memory)."""
    if BACKEND_NAME == "cupy":  # pragma: no cover
        xp.cuda.get_current_stream().synchronize()


def device_count():
    """GPUs this process can see (0 with NumPy; devicesim pretends to have ``devicesim.device_count``)."""
    if BACKEND_NAME == "cupy":  # pragma: no cover
        return xp.cuda.runtime.getDeviceCount()
    return xp.device_count if BACKEND_NAME == "devicesim" else 0


def current_device():
    """The GPU this process computes on (None with NumPy)."""
    if BACKEND_NAME == "cupy":  # pragma: no cover
        return xp.cuda.Device().id
    return xp.current_device if BACKEND_NAME == "devicesim" else None


def use_device(index):
    """Make GPU ``index`` the one this process allocates on and computes with."""
    if BACKEND_NAME == "cupy":  # pragma: no cover
        xp.cuda.Device(index).use()
    elif BACKEND_NAME == "devicesim":
        xp.use_device(index)


# float32 unless a run asks for float64 (the equivalence tests do).
_default_dtype = xp.float32


def default_dtype():
    return _default_dtype


def set_default_dtype(dtype):
    """Choose the dtype that Python numbers and layers built without a dtype get: float32 or float64.

    A process-wide setting for programs and notebooks; the library itself never changes it.
    A model asks for its dtype explicitly (``GPT(config, dtype=...)``, ``Module.to(dtype)``),
    and so does the Trainer, from its TrainConfig.
    """
    global _default_dtype
    dtype = xp.dtype(dtype).type
    if dtype not in (xp.float32, xp.float64):
        raise ValueError(f"default dtype must be float32 or float64, got {dtype}")
    _default_dtype = dtype


def host_rng(seed):
    """A NumPy random generator on the host: parameters and batches are drawn here and copied
    to the backend, so a run gives the same numbers under NumPy and CuPy."""
    return _host.random.default_rng(seed)
