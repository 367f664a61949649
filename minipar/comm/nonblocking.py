"""The Communicator's nonblocking collectives: start now, ``wait()`` on the returned Request later.

Data parallelism allreduces a gradient bucket while backward computes the next
(``iallreduce``, MPI_Iallreduce; Li et al. 2020, section 3.2.3); ZeRO reduce-scatters a unit of
gradients during backward and ZeRO-3 prefetches the next piece's parameters
(``ireduce_scatter``, ``iallgather``). Bytes are counted when posted (the ring's textbook volume,
as for the blocking built-ins), seconds as the time blocked in posting and waiting. A transport
without the nonblocking call (the GPU ones) runs the blocking one and returns a finished request.
"""
import time

from mpi4py import MPI

from minipar.comm.arguments import MPI_OPS, check_array, check_choice
from minipar.comm.records import Request


class NonblockingCollectives:
    """Mixed into ``Communicator``: uses its ``wire``, ``_account``, ``_modelled`` and ``_check_gather_shapes``."""

    def iallreduce(self, array, op="sum"):
        """Start an in-place allreduce (MPI_Iallreduce) and return its Request.

        Lets data parallelism reduce one gradient while backward computes the next.
        """
        check_choice(op, MPI_OPS, "op", "iallreduce")
        check_array(array, "array", "iallreduce", writable=True)
        started = time.perf_counter()
        mpi_request = self.wire.Iallreduce(MPI.IN_PLACE, array, MPI_OPS[op])
        traffic = self._modelled("allreduce", array.size, array.itemsize)
        self._account("iallreduce", array.size, traffic, started, 0, notify=False)
        return Request(self, "iallreduce", mpi_request, None, array, array.nbytes, started)

    def ireduce_scatter(self, send, out, op="sum"):
        """Start ``reduce_scatter`` (MPI_Ireduce_scatter_block) and return its Request; ``send``
        must not change and ``out`` is not valid until ``wait()``. ZeRO starts one per unit of
        gradients during backward (--overlap). A transport without the nonblocking call (the GPU
        ones) runs the blocking one and returns a finished request."""
        check_choice(op, MPI_OPS, "op", "ireduce_scatter")
        self._check_gather_shapes(piece=out, whole=send, call="reduce_scatter")
        started = time.perf_counter()
        start = getattr(self.wire, "Ireduce_scatter_block", None)
        if start is None:
            self.wire.Reduce_scatter_block(send, out, MPI_OPS[op])
            mpi_request = MPI.REQUEST_NULL
        else:
            mpi_request = start(send, out, MPI_OPS[op])
        traffic = self._modelled("reduce_scatter", send.size, send.itemsize)
        self._account("ireduce_scatter", send.size, traffic, started, 0, notify=False)
        return Request(self, "ireduce_scatter", mpi_request, None, out, send.nbytes, started)

    def iallgather(self, send, out):
        """Start ``allgather`` (MPI_Iallgather) and return its Request; ``out`` is valid after
        ``wait()``. ZeRO-3 prefetches the next piece's parameters with it (--overlap); blocking
        on transports without it, as ``ireduce_scatter``."""
        self._check_gather_shapes(piece=send, whole=out, call="allgather")
        started = time.perf_counter()
        start = getattr(self.wire, "Iallgather", None)
        if start is None:
            self.wire.Allgather(send, out)
            mpi_request = MPI.REQUEST_NULL
        else:
            mpi_request = start(send, out)
        traffic = self._modelled("allgather", out.size, out.itemsize)
        self._account("iallgather", out.size, traffic, started, 0, notify=False)
        return Request(self, "iallgather", mpi_request, None, out, out.nbytes, started)
