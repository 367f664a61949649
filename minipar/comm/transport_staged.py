"""The ``staged`` transport: device -> page-locked host buffer -> MPI -> host buffer -> device.

The default way arrays on a GPU reach the other ranks, with any MPI (``minipar.comm.transport``
chooses among the three). Each message costs one device-to-host copy where it is sent and one
host-to-device copy where it arrives, counted by ``minipar.backend.copy_counts``; the host
buffers come from a pool and are reused, so a step allocates none after the first. A group of
one rank (``LoneStagedWire``) exchanges nothing, so it copies nothing either.
"""
from mpi4py import MPI

from minipar import backend


class _PinnedPool:
    """Page-locked host buffers, lent out and given back, so staging allocates nothing in steady state."""

    def __init__(self):
        self._free = []

    def take(self, like):
        """A host array of ``like``'s dtype and shape (contents undefined) and the buffer it lives in."""
        nbytes = like.nbytes
        fits = [index for index, buffer in enumerate(self._free) if buffer.nbytes >= nbytes]
        if fits:  # the smallest free buffer that is big enough
            buffer = self._free.pop(min(fits, key=lambda index: self._free[index].nbytes))
        else:
            buffer = backend.empty_pinned(max(nbytes, 1 << 10))
        return buffer[:nbytes].view(like.dtype).reshape(like.shape), buffer

    def give_back(self, *buffers):
        self._free.extend(buffer for buffer in buffers if buffer is not None)


class _StagedRequest:
    """A non-blocking MPI request on host buffers; on completion copies the result to the device."""

    def __init__(self, mpi_request, pool, buffers, host_result=None, device_result=None):
        self._mpi_request, self._pool, self._buffers = mpi_request, pool, buffers
        self._host_result, self._device_result = host_result, device_result

    def _complete(self):
        if self._device_result is not None:
            backend.from_host(self._host_result, out=self._device_result)
        self._pool.give_back(*self._buffers)

    def Wait(self):
        self._mpi_request.Wait()
        self._complete()

    def Test(self):
        done = self._mpi_request.Test()
        if done:
            self._complete()
        return done


class StagedWire:
    """MPI on host copies: device -> pinned host buffer -> MPI -> host buffer -> device."""

    def __init__(self, mpi_comm):
        self.mpi = mpi_comm
        self._pool = _PinnedPool()

    def Get_rank(self):
        return self.mpi.Get_rank()

    def Get_size(self):
        return self.mpi.Get_size()

    def _outgoing(self, array):
        host, buffer = self._pool.take(array)
        backend.to_host(array, out=host)
        return host, buffer

    def _arrived(self, host, array, *buffers):
        backend.from_host(host, out=array)
        self._pool.give_back(*buffers)

    def Send(self, array, dest, tag=0):
        host, buffer = self._outgoing(array)
        self.mpi.Send(host, dest, tag)
        self._pool.give_back(buffer)

    def Recv(self, out, source, tag=0):
        host, buffer = self._pool.take(out)
        self.mpi.Recv(host, source, tag)
        self._arrived(host, out, buffer)

    def Sendrecv(self, array, dest, sendtag, out, source, recvtag):
        host_send, send_buffer = self._outgoing(array)
        host_out, out_buffer = self._pool.take(out)
        self.mpi.Sendrecv(host_send, dest, sendtag, host_out, source, recvtag)
        self._arrived(host_out, out, send_buffer, out_buffer)

    def Isend(self, array, dest, tag=0):
        host, buffer = self._outgoing(array)
        return _StagedRequest(self.mpi.Isend(host, dest, tag), self._pool, [buffer])

    def Irecv(self, out, source, tag=0):
        host, buffer = self._pool.take(out)
        return _StagedRequest(self.mpi.Irecv(host, source, tag), self._pool, [buffer], host, out)

    def Iallreduce(self, in_place, array, op):
        host, buffer = self._outgoing(array)
        return _StagedRequest(self.mpi.Iallreduce(MPI.IN_PLACE, host, op), self._pool, [buffer], host, array)

    def Allreduce(self, source, result, op):
        if source is MPI.IN_PLACE:
            host_result, result_buffer = self._outgoing(result)
            host_source, source_buffer = MPI.IN_PLACE, None
        else:
            host_result, result_buffer = self._pool.take(result)
            host_source, source_buffer = self._outgoing(source)
        self.mpi.Allreduce(host_source, host_result, op)
        self._arrived(host_result, result, result_buffer, source_buffer)

    def Allgather(self, send, out):
        host_send, send_buffer = self._outgoing(send)
        host_out, out_buffer = self._pool.take(out)
        self.mpi.Allgather(host_send, host_out)
        self._arrived(host_out, out, send_buffer, out_buffer)

    def Reduce_scatter_block(self, send, out, op):
        host_send, send_buffer = self._outgoing(send)
        host_out, out_buffer = self._pool.take(out)
        self.mpi.Reduce_scatter_block(host_send, host_out, op)
        self._arrived(host_out, out, send_buffer, out_buffer)

    def Bcast(self, array, root=0):
        if self.mpi.Get_rank() == root:
            host, buffer = self._outgoing(array)
            self.mpi.Bcast(host, root)
            self._pool.give_back(buffer)  # the root's array already holds the values
        else:
            host, buffer = self._pool.take(array)
            self.mpi.Bcast(host, root)
            self._arrived(host, array, buffer)

    def Reduce(self, send, out, op, root=0):
        host_send, send_buffer = self._outgoing(send)
        if self.mpi.Get_rank() != root:
            self.mpi.Reduce(host_send, None, op, root)
            self._pool.give_back(send_buffer)
            return
        host_out, out_buffer = self._pool.take(out)
        self.mpi.Reduce(host_send, host_out, op, root)
        self._arrived(host_out, out, send_buffer, out_buffer)

    def Scatter(self, send, out, root=0):
        host_send, send_buffer = self._outgoing(send) if self.mpi.Get_rank() == root else (None, None)
        host_out, out_buffer = self._pool.take(out)
        self.mpi.Scatter(host_send, host_out, root=root)
        self._arrived(host_out, out, send_buffer, out_buffer)


class _Done:
    def Wait(self):
        pass

    def Test(self):
        return True


class LoneStagedWire(StagedWire):
    """A group of one rank: its collectives exchange nothing, so they copy nothing to the host."""

    def Allreduce(self, source, result, op):
        if source is not MPI.IN_PLACE:
            result[...] = source

    def Iallreduce(self, in_place, array, op):
        return _Done()

    def Allgather(self, send, out):
        out[...] = send

    def Reduce_scatter_block(self, send, out, op):
        out[...] = send

    def Bcast(self, array, root=0):
        pass

    def Reduce(self, send, out, op, root=0):
        out[...] = send

    def Scatter(self, send, out, root=0):
        out[...] = send
