"""A spy on an mpi4py communicator: every call a rank makes, noted, and sends made synchronous.

A check hands the student's code a ``Spy`` instead of the raw communicator (or puts one
inside a ``minipar.comm.Communicator`` as its ``mpi`` and ``wire``, see ``spy_on``). The spy
forwards every call to MPI and notes, per call: the method, the peer, the number of elements
and the dtype. A contract (``checks_comm.py``, ``checks_data.py``) then reads the notes: a
hand-built collective uses point-to-point calls only, $2(N−1)$ messages of about $n/N$ elements
each to one neighbour; ZeRO-1 reduce-scatters and all-gathers, never allreduces the gradients.

Sends are made synchronous (``synchronous=True``, the default): ``Send`` becomes ``Ssend`` and
``Isend`` becomes ``Issend``. A standard-mode send of a small message usually returns at once
(MPI buffers it: the "eager" protocol), so a ring in which every rank first sends and then
receives works in a test and deadlocks in a real run once the blocks outgrow the eager limit.
A synchronous send returns only once the matching receive has started, so such an ordering
deadlocks here every time, on any message size (MPI standard, section 3.4, "Communication
modes"). ``Sendrecv`` and ``Isend``/``Irecv`` pairs never need buffering, so they pass.
"""
import time
from dataclasses import dataclass

import numpy as np  # host-side bookkeeping of the buffers MPI moves

POINT_TO_POINT = {"Send", "Ssend", "Bsend", "Rsend", "Recv", "Sendrecv", "Sendrecv_replace", "Isend",
                  "Issend", "Irecv", "send", "recv", "isend", "irecv", "sendrecv", "ssend", "issend"}
COLLECTIVE = {"Allreduce", "Iallreduce", "Reduce", "Ireduce", "Bcast", "Ibcast", "Allgather", "Iallgather",
              "Allgatherv", "Reduce_scatter", "Reduce_scatter_block", "Ireduce_scatter_block", "Alltoall",
              "Alltoallv", "Gather", "Gatherv", "Scatter", "Scatterv", "Scan", "Exscan", "Barrier",
              "allreduce", "allgather", "bcast", "reduce", "gather", "scatter", "alltoall", "barrier"}


@dataclass
class Call:
    method: str        # the mpi4py method the code called ("Send", "Sendrecv", "Allreduce", ...)
    peer: object       # destination of a send, source of a receive, None for a collective
    direction: str     # "send", "recv" or "collective"
    elements: int      # elements of the buffer (0 for pickled objects)
    itemsize: int
    dtype: str
    time: float        # time.perf_counter() when the call began
    offset: object = None   # element offset of the buffer inside the spy's ``base`` array, if it lies there

    @property
    def nbytes(self):
        return self.elements * self.itemsize


def _buffer(spec):
    """The array of an mpi4py buffer argument (an array, or [array, MPI type] / [array, count, type])."""
    if isinstance(spec, (list, tuple)) and spec and hasattr(spec[0], "dtype"):
        spec = spec[0]
    return np.asarray(spec) if hasattr(spec, "dtype") else None


def _any(source, tag):
    """mpi4py's defaults: any source, any tag."""
    from mpi4py import MPI

    return (MPI.ANY_SOURCE if source is None else source), (MPI.ANY_TAG if tag is None else tag)


class Spy:
    """An mpi4py communicator that notes every call and makes sends synchronous."""

    def __init__(self, comm, synchronous=True, base=None):
        self._comm, self.synchronous, self.calls, self.base = comm, synchronous, [], base

    def __getattr__(self, name):
        attribute = getattr(self._comm, name)
        if name in COLLECTIVE and callable(attribute):
            def collective(*args, **kwargs):
                arrays = [_buffer(a) for a in args]
                array = next((a for a in arrays if a is not None), None)
                self._note(name, None, "collective", array)
                return attribute(*args, **kwargs)

            return collective
        if name in POINT_TO_POINT and callable(attribute):   # pickled point-to-point: noted, not sized
            def pickled(*args, **kwargs):
                self._note(name, kwargs.get("dest", kwargs.get("source")), "send" if "send" in name else "recv",
                           None)
                return attribute(*args, **kwargs)

            return pickled
        return attribute

    def _note(self, method, peer, direction, array):
        self.calls.append(Call(method, peer, direction, 0 if array is None else int(array.size),
                               0 if array is None else array.itemsize, "" if array is None else str(array.dtype),
                               time.perf_counter(), self._offset(array)))

    def _offset(self, array):
        if self.base is None or array is None or array.size == 0:
            return None
        start = self.base.__array_interface__["data"][0]
        offset, remainder = divmod(array.__array_interface__["data"][0] - start, self.base.itemsize)
        return offset if remainder == 0 and 0 <= offset < self.base.size else None

    # ---- point to point with buffers -----------------------------------------------------
    def Send(self, buf, dest, tag=0):
        self._note("Send", dest, "send", _buffer(buf))
        return (self._comm.Ssend if self.synchronous else self._comm.Send)(buf, dest, tag)

    def Ssend(self, buf, dest, tag=0):
        self._note("Ssend", dest, "send", _buffer(buf))
        return self._comm.Ssend(buf, dest, tag)

    def Isend(self, buf, dest, tag=0):
        self._note("Isend", dest, "send", _buffer(buf))
        return (self._comm.Issend if self.synchronous else self._comm.Isend)(buf, dest, tag)

    def Issend(self, buf, dest, tag=0):
        self._note("Issend", dest, "send", _buffer(buf))
        return self._comm.Issend(buf, dest, tag)

    def Recv(self, buf, source=None, tag=None, status=None):
        source, tag = _any(source, tag)
        self._note("Recv", source, "recv", _buffer(buf))
        return self._comm.Recv(buf, source, tag, status)

    def Irecv(self, buf, source=None, tag=None):
        source, tag = _any(source, tag)
        self._note("Irecv", source, "recv", _buffer(buf))
        return self._comm.Irecv(buf, source, tag)

    def Sendrecv(self, sendbuf, dest, sendtag=0, recvbuf=None, source=None, recvtag=None, status=None):
        source, recvtag = _any(source, recvtag)
        self._note("Sendrecv", dest, "send", _buffer(sendbuf))
        self._note("Sendrecv", source, "recv", _buffer(recvbuf))
        return self._comm.Sendrecv(sendbuf, dest, sendtag, recvbuf, source, recvtag, status)

    # ---- what the notes say ------------------------------------------------------------------
    def sends(self):
        return [call for call in self.calls if call.direction == "send"]

    def receives(self):
        return [call for call in self.calls if call.direction == "recv"]

    def collectives(self):
        return [call for call in self.calls if call.direction == "collective"]

    def clear(self):
        self.calls = []


def spy_on(communicator, synchronous=False):
    """Put a Spy between ``communicator`` (a minipar Communicator on host arrays) and MPI; returns it.

    Every call the Communicator makes goes through ``wire`` (host arrays: the raw communicator
    itself), and code that reaches for ``communicator.mpi`` gets the spy as well.
    """
    spy = Spy(communicator.mpi, synchronous=synchronous)
    communicator.mpi = communicator.wire = spy
    return spy
