"""Checks for the hand-built collectives (minipar/comm/collectives.py).

Data: element j of rank r is (1 + j mod 4)·10^r (``digit_data``), so a wrong sum names the
ranks whose contribution is missing or doubled. Counts are odd (3N + 1 elements) so blocks
differ in size and an off-by-one block boundary shows; N = 3 and 6 exercise the folding of
ranks beyond a power of two in recursive doubling.
"""
import numpy as np

from minipar.course.checking import Check, compare, digit_data, digit_sum, digits_hint, require


def _collectives():
    from minipar.comm import collectives

    return collectives


def _own_block(count, rank, size):
    return _collectives().block_bounds(count, size)[rank]


def check_reduce_scatter(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    count = 3 * size + 1
    buffer = digit_data(rank, count)
    traffic = _collectives().ring_reduce_scatter(comm, buffer)
    start, stop = _own_block(count, rank, size)
    compare(f"rank {rank}: block {rank} (elements {start}:{stop}) after ring_reduce_scatter, element",
            buffer[start:stop], digit_sum(size, count)[start:stop],
            "the sum over all ranks of their element", digits_hint(size))
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
    traffic = _collectives().ring_all_gather(comm, buffer)
    compare(f"rank {rank}: buffer after ring_all_gather, element", buffer, everyone,
            "block b comes from rank b; -1 means nothing arrived")
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
