"""Checks for the hand-built collectives (minipar/comm/collectives.py).

Data: element j of rank r is (1 + j mod 4)·10^r (``digit_data``), so a wrong sum names the
ranks whose contribution is missing or doubled. Counts are odd (3N + 1 elements) so blocks
differ in size and an off-by-one block boundary shows; N = 3 and 6 exercise the folding of
ranks beyond a power of two in recursive doubling.
"""
import numpy as np

from minipar.course.checking import (
    Check,
    CheckFailure,
    compare,
    digit_data,
    digit_sum,
    digits_hint,
    require,
)


class TracingComm:
    """An mpi4py communicator that notes each point-to-point message: step, partner, block of ``buffer``.

    The trace is only read after a check has failed, to say where the messages first left the
    textbook schedule; a different but correct schedule never fails because of it.
    """

    def __init__(self, comm, buffer):
        self.comm, self.buffer, self.sent, self.received = comm, buffer, [], []

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def _block(self, array):
        base = self.buffer.__array_interface__["data"][0]
        offset = (np.asarray(array).__array_interface__["data"][0] - base) // self.buffer.itemsize
        if not 0 <= offset < self.buffer.size:
            return None
        bounds = _collectives().block_bounds(self.buffer.size, self.comm.Get_size())
        return next((b for b, (start, stop) in enumerate(bounds) if start == offset), None)

    def Sendrecv(self, sendbuf, dest, sendtag=0, recvbuf=None, source=None, recvtag=None, status=None):
        self.sent.append((dest, self._block(sendbuf)))
        self.received.append((source, self._block(recvbuf)))
        return self.comm.Sendrecv(sendbuf, dest, sendtag, recvbuf, source, recvtag, status)

    def Send(self, buf, dest, tag=0):
        self.sent.append((dest, self._block(buf)))
        return self.comm.Send(buf, dest, tag)

    def Recv(self, buf, source, tag=0, status=None):
        self.received.append((source, self._block(buf)))
        return self.comm.Recv(buf, source, tag, status)


def _ring_schedule_hint(trace, rank, size, first_block):
    """Where this rank's sends first differ from the ring: block (r − s − first_block) mod N to r + 1."""
    for step, (dest, block) in enumerate(trace.sent):
        expected = (rank - step - first_block) % size
        if dest != (rank + 1) % size or (block is not None and block != expected):
            shown = f"block {block}" if block is not None else "a buffer that is not one block of it"
            rule = f"(r - s - {first_block}) mod N" if first_block else "(r - s) mod N"
            return (f"at step {step} rank {rank} sent {shown} to rank {dest}; at step s the ring sends block "
                    f"{rule} = {expected} to r + 1 = {(rank + 1) % size} and receives from r - 1 = "
                    f"{(rank - 1) % size}")
    return ""


def _traced(run, trace, hint):
    """Run ``run()``; on a failure or an exception, add where the messages left the schedule."""
    try:
        run()
    except Exception as error:
        extra = hint()
        if not extra:
            raise
        lines = str(error).strip().splitlines() or [""]
        what = str(error) if isinstance(error, CheckFailure) else f"raised {type(error).__name__}: {lines[-1]}"
        raise CheckFailure(f"{what}\n{extra}") from error


def _collectives():
    from minipar.comm import collectives

    return collectives


def _own_block(count, rank, size):
    return _collectives().block_bounds(count, size)[rank]


def check_reduce_scatter(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    count = 3 * size + 1
    buffer = digit_data(rank, count)
    trace = TracingComm(comm, buffer)
    start, stop = _own_block(count, rank, size)
    outcome = {}

    def run():
        outcome["traffic"] = _collectives().ring_reduce_scatter(trace, buffer)
        compare(f"rank {rank}: block {rank} (elements {start}:{stop}) after ring_reduce_scatter, element",
                buffer[start:stop], digit_sum(size, count)[start:stop],
                "the sum over all ranks of their element", digits_hint(size))

    _traced(run, trace, lambda: _ring_schedule_hint(trace, rank, size, 1))
    traffic = outcome["traffic"]
    sent = (count - (stop - start)) * buffer.itemsize
    require(traffic is not None and traffic.bytes_sent == sent,
            f"rank {rank}: ring_reduce_scatter reported {getattr(traffic, 'bytes_sent', None)} bytes sent, "
            f"expected {sent} (every block but its own, (N-1)/N of the buffer: return the Traffic you counted)")


def check_all_gather(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    count = 3 * size + 1
    everyone = digit_sum(size, count)
    buffer = np.full(count, -1.0)        # only the own block is known on entry
    start, stop = _own_block(count, rank, size)
    buffer[start:stop] = everyone[start:stop]
    trace = TracingComm(comm, buffer)
    outcome = {}

    def run():
        outcome["traffic"] = _collectives().ring_all_gather(trace, buffer)
        compare(f"rank {rank}: buffer after ring_all_gather, element", buffer, everyone,
                "block b comes from rank b; -1 means nothing arrived")

    _traced(run, trace, lambda: _ring_schedule_hint(trace, rank, size, 0))
    traffic = outcome["traffic"]
    next_block = _own_block(count, (rank + 1) % size, size)
    sent = 0 if size == 1 else (count - (next_block[1] - next_block[0])) * buffer.itemsize
    require(traffic is not None and traffic.bytes_sent == sent,
            f"rank {rank}: ring_all_gather reported {getattr(traffic, 'bytes_sent', None)} bytes sent, "
            f"expected {sent} (every block but block rank+1's)")


def _allreduce_check(function_name):
    def check(comm):
        rank, size = comm.Get_rank(), comm.Get_size()
        count = 3 * size + 1
        buffer = digit_data(rank, count)
        getattr(_collectives(), function_name)(comm, buffer)
        compare(f"rank {rank}: buffer after {function_name}(op='sum'), element", buffer, digit_sum(size, count),
                "the sum over all ranks of their element", digits_hint(size))
        peaks = np.array([float((rank * 7 + j * 3) % (size + 2)) for j in range(count)])
        getattr(_collectives(), function_name)(comm, peaks, op="max")
        expected = np.max([[float((r * 7 + j * 3) % (size + 2)) for j in range(count)] for r in range(size)], axis=0)
        compare(f"rank {rank}: buffer after {function_name}(op='max'), element", peaks, expected,
                "the largest of every rank's element, (7r + 3j) mod (N+2) on rank r")

    return check


RING_SIZES = (1, 2, 3, 4, 8)
RING = [
    Check("ring_reduce_scatter", RING_SIZES, check_reduce_scatter),
    Check("ring_all_gather", RING_SIZES, check_all_gather),
    Check("ring_allreduce", (2, 3, 8), _allreduce_check("ring_allreduce")),
]
RECURSIVE_DOUBLING = [
    Check("recursive_doubling_allreduce", (1, 2, 3, 4, 6, 8), _allreduce_check("recursive_doubling_allreduce")),
]
