"""The ``nccl`` transport: NVIDIA's collectives on the GPU, through ``cupy.cuda.nccl``.

One NCCL communicator per process group, built from a unique id that rank 0 broadcasts
over MPI (NCCL User Guide, "Creating a communicator"). It offers the same buffer methods
as the other wires in ``minipar.comm.transport``, on device arrays. Not run without a GPU:
see docs/gpu.md for what is verified.
"""
from mpi4py import MPI

from minipar import backend


class _NcclRequest:  # pragma: no cover - needs a GPU
    def __init__(self, wire):
        self._wire = wire

    def Wait(self):
        self._wire._flush()
        backend.synchronize()

    def Test(self):
        self.Wait()
        return True


class NcclWire:  # pragma: no cover - needs GPUs
    """One NCCL communicator over the ranks of ``mpi_comm``; device arrays in, device arrays out.

    NCCL has no tags: messages between two ranks match in the order they are posted, which
    the schedules and collectives here keep. ``Isend``/``Irecv`` are queued and posted
    together (one NCCL group) at the next call or wait, so pairs of them cannot deadlock.
    """

    def __init__(self, mpi_comm):
        from cupy.cuda import nccl

        self.mpi, self._nccl = mpi_comm, nccl
        unique_id = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        unique_id = mpi_comm.bcast(unique_id, root=0)  # 128 bytes of metadata
        self._comm = nccl.NcclCommunicator(mpi_comm.Get_size(), unique_id, mpi_comm.Get_rank())
        self._queued = []
        self._types = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64,
                       "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64, "uint8": nccl.NCCL_UINT8}
        self._ops = {MPI.SUM: nccl.NCCL_SUM, MPI.MAX: nccl.NCCL_MAX}

    def Get_rank(self):
        return self.mpi.Get_rank()

    def Get_size(self):
        return self.mpi.Get_size()

    def _args(self, array):
        return array.data.ptr, array.size, self._types[array.dtype.name]

    @property
    def _stream(self):
        return backend.xp.cuda.get_current_stream().ptr

    def _grouped(self, *calls):
        """Run queued and new point-to-point calls as one NCCL group, then wait for them."""
        calls, self._queued = [*self._queued, *calls], []
        self._nccl.groupStart()
        for call in calls:
            call()
        self._nccl.groupEnd()

    def _flush(self):
        if self._queued:
            self._grouped()

    def _send(self, array, dest):
        return lambda: self._comm.send(*self._args(array), dest, self._stream)

    def _recv(self, out, source):
        return lambda: self._comm.recv(*self._args(out), source, self._stream)

    def Send(self, array, dest, tag=0):
        self._grouped(self._send(array, dest))
        backend.synchronize()

    def Recv(self, out, source, tag=0):
        self._grouped(self._recv(out, source))
        backend.synchronize()

    def Sendrecv(self, array, dest, sendtag, out, source, recvtag):
        self._grouped(self._send(array, dest), self._recv(out, source))
        backend.synchronize()

    def Isend(self, array, dest, tag=0):
        self._queued.append(self._send(array, dest))
        return _NcclRequest(self)

    def Irecv(self, out, source, tag=0):
        self._queued.append(self._recv(out, source))
        return _NcclRequest(self)

    def _collective(self, run):
        self._flush()
        run()
        backend.synchronize()

    def Allreduce(self, source, result, op):
        pointer = result.data.ptr if source is MPI.IN_PLACE else source.data.ptr
        self._collective(lambda: self._comm.allReduce(pointer, *self._args(result), self._ops[op], self._stream))

    def Iallreduce(self, in_place, array, op):
        self._flush()
        self._comm.allReduce(array.data.ptr, *self._args(array), self._ops[op], self._stream)
        return _NcclRequest(self)

    def Allgather(self, send, out):
        pointer, count, datatype = self._args(send)
        self._collective(lambda: self._comm.allGather(pointer, out.data.ptr, count, datatype, self._stream))

    def Reduce_scatter_block(self, send, out, op):
        self._collective(lambda: self._comm.reduceScatter(send.data.ptr, *self._args(out), self._ops[op],
                                                          self._stream))

    def Bcast(self, array, root=0):
        self._collective(lambda: self._comm.bcast(*self._args(array), root, self._stream))

    def Reduce(self, send, out, op, root=0):
        pointer, count, datatype = self._args(send)
        target = out.data.ptr if out is not None else pointer  # only the root's is written
        self._collective(lambda: self._comm.reduce(pointer, target, count, datatype, self._ops[op], root,
                                                   self._stream))

    def Scatter(self, send, out, root=0):
        """NCCL has no scatter: the root sends block r to rank r, all in one group."""
        rank, rows = self.mpi.Get_rank(), out.shape[0]
        if rank != root:
            self._grouped(self._recv(out, root))
        else:
            out[...] = send[root * rows:(root + 1) * rows]
            self._grouped(*(self._send(send[r * rows:(r + 1) * rows], r) for r in range(self.mpi.Get_size())
                            if r != root))
        backend.synchronize()
