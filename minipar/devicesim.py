"""devicesim: a strict stand-in for CuPy, so device code is tested on machines without a GPU.

``MINIPAR_BACKEND=devicesim`` (or ``--backend devicesim``) makes this module ``xp``. Its
arrays, ``DeviceArray``, hold a NumPy array, so every result is bitwise what NumPy computes;
what they imitate is CuPy's boundary with host memory (``cupy/_core/core.pyx``):

- ``numpy.asarray(x)`` and ``x.__array__()`` raise ``TypeError`` ("Implicit conversion to a
  NumPy array is not allowed"), so ``numpy.save(f, x)``, ``numpy.testing`` on x and NumPy
  functions CuPy lacks all fail; x offers no buffer, so MPI's buffer methods refuse it;
- a NumPy array meeting a device array in an operation, an index or an assignment raises
  ``TypeError``. (CuPy refuses it in operations; it quietly copies ``x[:] = host`` and host
  index arrays to the device. Here those fail too, so that every copy has a name.)
- ``float(x)``, ``int(x)``, ``bool(x)`` work for one element only and, like printing x, copy
  it to the host: counted as *implicit* copies, the ones a training step must not make;
- assigning through repeated integer indices raises ``ValueError``: CuPy keeps an undefined
  one of the values where NumPy keeps the last.

Explicit copies are counted in ``transfers``: ``asnumpy(x)``, ``x.get()``, ``x.item()``,
``x.tolist()`` and ``x.tobytes()`` (device to host, "to_host"); ``asarray(host)``, ``array(host)`` and
``x.set(host)`` (host to device, "to_device"); each with its bytes ("to_host_bytes", ...).

The namespace holds what minipar uses of NumPy's API that CuPy also has; anything else is an
``AttributeError``, so code cannot lean on a function the GPU will not have. The array class and
the counter live in ``minipar/devicesim_array.py``; this module is the namespace around them.
"""
import numpy as _np

from minipar.devicesim_array import (  # noqa: F401  (devicesim.transfers, as tests read it)
    _FUNCTIONS,
    _UFUNCS,
    DeviceArray,
    _count,
    _on_device,
    _unwrap,
    _wrap,
    reset_transfers,
    transfers,
)

ndarray = DeviceArray


# ---- explicit copies --------------------------------------------------------------------

def asarray(a, dtype=None, order=None):
    """A device array: ``a`` itself (or cast) if already on the device, else a counted copy of it."""
    if type(a) is DeviceArray:
        return DeviceArray(_np.asarray(a._array, dtype=dtype, order=order))
    host = _np.asarray(a, dtype=dtype, order=order)
    _count("to_device", host.nbytes)
    return DeviceArray(host.copy())  # device memory never aliases host memory


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if type(a) is DeviceArray:
        return DeviceArray(_np.array(a._array, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    host = _np.array(a, dtype=dtype, order=order, ndmin=ndmin)
    _count("to_device", host.nbytes)
    return DeviceArray(host)


def ascontiguousarray(a, dtype=None):
    return DeviceArray(_np.ascontiguousarray(asarray(a)._array, dtype=dtype))


def asnumpy(a, stream=None, out=None):
    """A NumPy array with the values of ``a`` (a counted copy when ``a`` is on the device)."""
    if type(a) is DeviceArray:
        return a.get(out=out)
    return _np.asarray(a)


# ---- devices ----------------------------------------------------------------------------

device_count = 1  # how many devices the stand-in pretends to have (tests change it)
current_device = 0


def use_device(index):
    global current_device
    if not 0 <= index < device_count:
        raise ValueError(f"device {index} does not exist ({device_count} simulated)")
    current_device = index


class linalg:  # mirrors cupy.linalg (the part minipar uses)
    qr = staticmethod(_on_device(_np.linalg.qr))
    norm = staticmethod(_on_device(_np.linalg.norm))


class testing:  # mirrors cupy.testing
    @staticmethod
    def assert_allclose(actual, desired, *args, **kwargs):
        _np.testing.assert_allclose(asnumpy(actual), asnumpy(desired), *args, **kwargs)


_NAMES = frozenset("""
    float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool_ intp complex64
    complex128 dtype finfo iinfo result_type promote_types can_cast broadcast_shapes nan inf pi e newaxis
    floating integer number generic
""".split())


def __getattr__(name):
    if name in _UFUNCS:
        value = _DeviceUfunc(getattr(_np, name))
    elif name in _FUNCTIONS:
        value = _on_device(getattr(_np, name))
    elif name in _NAMES:
        value = getattr(_np, name)
    else:
        raise AttributeError(f"devicesim has no {name!r}: it offers only the part of NumPy's API that "
                             "minipar uses and CuPy has (add the name to devicesim if CuPy has it too)")
    globals()[name] = value  # cached: __getattr__ runs once per name
    return value


class _DeviceUfunc:
    """A NumPy ufunc that takes and returns device arrays (with reduce, reduceat, at, ...)."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _wrap(self._ufunc(*_unwrap(args), **_unwrap(kwargs)))

    def __getattr__(self, method):
        return _on_device(getattr(self._ufunc, method))
