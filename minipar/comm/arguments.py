"""Argument checks shared by the Communicator's methods: every array handed to MPI is a
C-contiguous backend array (written into only when writable), and every choice is one of a known
set, so a mistake is a clear ShapeError or ConfigError on the calling rank before any message moves."""
from mpi4py import MPI

from minipar.errors import ConfigError, ShapeError

MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


def check_array(array, role, call, writable=False):
    if not hasattr(array, "flags") or not hasattr(array, "dtype"):
        raise ShapeError(f"{call}: {role} must be an array, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise ShapeError(
            f"{call}: {role} of shape {array.shape} is not C-contiguous; MPI moves contiguous "
            "buffers only, so pass xp.ascontiguousarray(...) or a preallocated array"
        )
    if writable and not getattr(array.flags, "writeable", True):
        raise ShapeError(f"{call}: {role} is read-only, but results are written into it")


def check_out_matches(array, out, call):
    check_array(out, "out", call, writable=True)
    if out.dtype != array.dtype or out.shape != array.shape:
        raise ShapeError(f"{call}: out is {out.dtype} {out.shape} but the array is {array.dtype} {array.shape}")


def check_choice(value, allowed, what, call):
    if value not in allowed:
        raise ConfigError(f"{call}: {what} must be one of {sorted(allowed)}, got {value!r}")
