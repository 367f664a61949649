"""devicesim's array: ``DeviceArray``, NumPy's values and maths behind CuPy's refusals, and the
copy counter ``transfers``.

What it refuses and what it counts is described in ``minipar/devicesim.py``, the module that poses
as CuPy (``xp``) and offers these arrays; build them with its ``asarray``.
"""
import functools
import os
from collections import Counter

import numpy as _np

transfers = Counter()


def reset_transfers():
    transfers.clear()


# MINIPAR_DEVICESIM_IMPLICIT=raise turns implicit copies into errors, to find where they happen.
RAISE_ON_IMPLICIT = os.environ.get("MINIPAR_DEVICESIM_IMPLICIT") == "raise"


def _count(direction, nbytes, implicit=False):
    if implicit and RAISE_ON_IMPLICIT:
        raise TypeError(f"implicit copy {direction.replace('_', ' ')} (MINIPAR_DEVICESIM_IMPLICIT=raise)")
    transfers[direction] += 1
    transfers[direction + "_bytes"] += int(nbytes)
    if implicit:
        transfers["implicit_" + direction] += 1


def _host_array_refused(value):
    return TypeError(
        f"Unsupported type {type(value)}: a host (NumPy) array cannot take part in a device "
        "operation; copy it to the device with minipar.backend.from_host first"
    )


def _unwrap(value):
    """The NumPy arrays inside device arrays (through lists, tuples and dicts); host arrays refused."""
    if type(value) is DeviceArray:
        return value._array
    if isinstance(value, _np.ndarray):
        raise _host_array_refused(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(item) for item in value)
    if isinstance(value, dict):
        return {key: _unwrap(item) for key, item in value.items()}
    return value


def _wrap(value):
    """Arrays (and NumPy scalars, which CuPy returns as 0-d arrays) become device arrays."""
    if isinstance(value, (_np.ndarray, _np.generic)):
        return DeviceArray(_np.asarray(value))
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    if isinstance(value, tuple):  # NumPy's named results (linalg.qr) are plain tuples in CuPy
        return tuple(_wrap(item) for item in value)
    return value


def _on_device(numpy_function):
    @functools.wraps(numpy_function)
    def run(*args, **kwargs):
        return _wrap(numpy_function(*_unwrap(args), **_unwrap(kwargs)))

    return run


class DeviceArray:
    """An array "on the device": NumPy's values and maths, CuPy's refusals. Build with ``asarray``."""

    __slots__ = ("_array",)
    __array_priority__ = 100
    __hash__ = None
    _HIDDEN = frozenset({"data", "ctypes", "__array_interface__", "__array_struct__", "tofile", "dump",
                         "dumps", "__buffer__", "__dlpack__", "__cuda_array_interface__"})

    def __init__(self, array):
        self._array = array

    def __getattr__(self, name):  # shape, dtype, flags, reshape, sum, astype, ... from NumPy
        if name == "_array" or name in DeviceArray._HIDDEN:
            raise AttributeError(f"devicesim arrays do not expose host memory ({name}); use asnumpy")
        value = getattr(self._array, name)
        return _on_device(value) if callable(value) else _wrap(value)

    # ---- the host boundary ------------------------------------------------------------

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None):
        """Copy to host memory (into ``out``, a NumPy array of the same dtype and shape, if given)."""
        _count("to_host", self.nbytes)
        if out is None:
            return self._array.copy(order=order)
        if not isinstance(out, _np.ndarray) or out.dtype != self.dtype or out.shape != self.shape:
            raise TypeError(f"get(out=...) needs a NumPy {self.dtype} array of shape {self.shape}")
        out[...] = self._array
        return out

    def set(self, host_array, stream=None):
        """Copy a NumPy array of the same dtype and shape into this array."""
        if not isinstance(host_array, _np.ndarray) or host_array.dtype != self.dtype:
            raise TypeError(f"set() needs a NumPy {self.dtype} array, got {type(host_array).__name__}")
        if host_array.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {host_array.shape}")
        _count("to_device", host_array.nbytes)
        self._array[...] = host_array

    def item(self):
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        _count("to_host", self.itemsize)
        return self._array.item()

    def tolist(self):
        _count("to_host", self.nbytes)
        return self._array.tolist()

    def tobytes(self, order="C"):
        _count("to_host", self.nbytes)
        return self._array.tobytes(order)

    def _implicit_copy(self):
        _count("to_host", self.nbytes, implicit=True)
        return self._array

    def _one_element(self):
        if self.size != 1:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return self._implicit_copy()

    def __float__(self):
        return float(self._one_element())

    def __int__(self):
        return int(self._one_element())

    def __complex__(self):
        return complex(self._one_element())

    def __bool__(self):
        if self.size > 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        return bool(self._implicit_copy())

    def __repr__(self):
        return repr(self._implicit_copy())

    def __str__(self):
        return str(self._implicit_copy())

    def __format__(self, spec):
        return format(self._implicit_copy(), spec)

    def __reduce__(self):  # pickling copies to the host, and unpickling back (as in CuPy)
        return _from_pickle, (self._implicit_copy().copy(),)

    # ---- containers and copies --------------------------------------------------------

    def __len__(self):
        return len(self._array)

    def __iter__(self):
        return (_wrap(row) for row in self._array)

    def __getitem__(self, index):
        return _wrap(self._array[_unwrap(index)])

    def __setitem__(self, index, value):
        index = _unwrap(index)
        if _repeats(index, self.shape):
            raise ValueError("assignment through repeated integer indices: CuPy keeps an undefined one of "
                             "the values (NumPy the last); accumulate with xp.add.at instead")
        self._array[index] = _unwrap(value)

    def __copy__(self):
        return DeviceArray(self._array.copy())

    def __deepcopy__(self, memo):
        return DeviceArray(self._array.copy())

    # ---- NumPy's protocols: numpy.exp(x) works on the device, numpy.save(x) does not ---

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or ufunc.__name__ not in _UFUNCS:
            return NotImplemented
        return _wrap(ufunc(*_unwrap(inputs), **_unwrap(kwargs)))

    def __array_function__(self, function, types, args, kwargs):
        if function.__module__ != "numpy" or function.__name__ not in _FUNCTIONS:
            return NotImplemented  # numpy then raises TypeError, as it does for CuPy
        return _wrap(function(*_unwrap(args), **_unwrap(kwargs)))


def _repeats(index, shape):
    """True if an index made only of integer arrays names some element twice."""
    parts = index if isinstance(index, tuple) else (index,)
    if not parts or not all(isinstance(part, _np.ndarray) and part.dtype.kind in "iu" for part in parts):
        return False
    arrays = _np.broadcast_arrays(*parts)
    dims = shape[:len(parts)]
    flat = _np.ravel_multi_index([array % size for array, size in zip(arrays, dims, strict=True)], dims)
    return _np.unique(flat).size < flat.size


def _from_pickle(host_array):
    _count("to_device", host_array.nbytes, implicit=True)
    return DeviceArray(host_array)


def _operator(name, in_place=False):
    def apply(self, other):
        result = getattr(self._array, name)(_unwrap(other))
        if result is NotImplemented:
            return result
        return self if in_place else _wrap(result)

    apply.__name__ = name
    return apply


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
              "rshift"):
    setattr(DeviceArray, f"__{_name}__", _operator(f"__{_name}__"))
    setattr(DeviceArray, f"__r{_name}__", _operator(f"__r{_name}__"))
    setattr(DeviceArray, f"__i{_name}__", _operator(f"__i{_name}__", in_place=True))
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(DeviceArray, f"__{_name}__", _operator(f"__{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(DeviceArray, f"__{_name}__", _on_device(getattr(_np, {"neg": "negative", "pos": "positive",
                                                                 "abs": "absolute", "invert": "invert"}[_name])))


# ---- what the device offers of NumPy's API (the protocols above, and devicesim's namespace) ----

_UFUNCS = frozenset("""
    abs absolute add subtract multiply divide true_divide floor_divide negative positive power remainder mod
    exp expm1 log log1p log2 log10 sqrt square tanh sinh cosh sin cos tan arctan arctanh sign reciprocal
    maximum minimum fmax fmin floor ceil rint trunc isfinite isnan isinf
    logical_not logical_and logical_or logical_xor equal not_equal less less_equal greater greater_equal
    bitwise_and bitwise_or bitwise_xor invert left_shift right_shift logaddexp
""".split())
_FUNCTIONS = frozenset("""
    zeros ones empty full zeros_like ones_like empty_like full_like arange linspace eye identity tri triu tril
    concatenate stack vstack hstack split array_split swapaxes moveaxis transpose reshape ravel squeeze
    expand_dims broadcast_to broadcast_arrays atleast_1d atleast_2d where sum mean var std max min amax amin prod
    cumsum cumprod diff argmax argmin argsort argpartition sort flatnonzero nonzero unravel_index ravel_multi_index
    matmul dot einsum outer tensordot clip allclose isclose array_equal any all take take_along_axis
    searchsorted repeat tile pad copy flip roll unique bincount count_nonzero around round
    average cross trace diagonal diag
""".split())
