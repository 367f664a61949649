"""The corpus of exercise pairwise_alltoall (The pairwise-exchange all-to-all(v): $N − 1$ Sendrecv steps, one
partner each way): wrong solutions that its checks must fail with the words of ``expect``, and correct
alternatives they must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import COLLECTIVES, Planted, region

_ALLTOALL_START = """
flat_send, flat_out = _flat(send), _flat(out)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
(s0, s1), (r0, r1) = send_bounds[rank], receive_bounds[rank]
if s1 - s0 != r1 - r0:
    raise ShapeError(f"all-to-all: rank {rank} sends itself {s1 - s0} elements but expects {r1 - r0}")
flat_out[r0:r1] = flat_send[s0:s1]
"""
_ALLTOALL_BUILT_IN = """
flat_send, flat_out = _flat(send), _flat(out)
def spec(array, bounds):
    return [array, ([stop - start for start, stop in bounds], [start for start, _ in bounds])]
mpi_comm.Alltoallv(spec(flat_send, send_bounds), spec(flat_out, receive_bounds))
return alltoall_traffic(mpi_comm.Get_rank(), send_bounds, receive_bounds, flat_send.itemsize)
"""
_ALLTOALL_FLOAT64_WIRE = _ALLTOALL_START + """
traffic = Traffic()
for step in range(1, size):
    dest, source = (rank + step) % size, (rank - step) % size
    outgoing = flat_send[send_bounds[dest][0]:send_bounds[dest][1]].astype("float64")
    incoming = flat_out[receive_bounds[source][0]:receive_bounds[source][1]].astype("float64")
    mpi_comm.Sendrecv(outgoing, dest, 5, incoming, source, 5)
    flat_out[receive_bounds[source][0]:receive_bounds[source][1]] = incoming
    traffic += Traffic(outgoing.nbytes, incoming.nbytes)
return traffic
"""
_ALLTOALL_EQUAL_BLOCKS = """
flat_send, flat_out = _flat(send), _flat(out)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
out_block, in_block = flat_send.size // size, flat_out.size // size
flat_out[rank * in_block:(rank + 1) * in_block] = flat_send[rank * out_block:(rank + 1) * out_block]
traffic = Traffic()
for step in range(1, size):
    dest, source = (rank + step) % size, (rank - step) % size
    outgoing = flat_send[dest * out_block:(dest + 1) * out_block]
    incoming = flat_out[source * in_block:(source + 1) * in_block]
    mpi_comm.Sendrecv(outgoing, dest, 5, incoming, source, 5)
    traffic += Traffic(outgoing.nbytes, incoming.nbytes)
return traffic
"""
_ALLTOALL_NONBLOCKING = _ALLTOALL_START + """
requests, traffic = [], Traffic()
for step in range(1, size):
    source = (rank - step) % size
    incoming = flat_out[receive_bounds[source][0]:receive_bounds[source][1]]
    requests.append(mpi_comm.Irecv(incoming, source, 5))
    traffic += Traffic(0, incoming.nbytes)
for step in range(1, size):
    dest = (rank + step) % size
    outgoing = flat_send[send_bounds[dest][0]:send_bounds[dest][1]]
    requests.append(mpi_comm.Isend(outgoing, dest, 5))
    traffic += Traffic(outgoing.nbytes, 0)
for request in requests:
    request.Wait()
return traffic
"""
_ALLTOALL_XOR_SKIPPING_EMPTY = _ALLTOALL_START + """
traffic = Traffic()
for step in range(1, size):
    if size & (size - 1) == 0:
        dest = source = rank ^ step
    else:
        dest, source = (rank - step) % size, (rank + step) % size
    outgoing = flat_send[send_bounds[dest][0]:send_bounds[dest][1]]
    incoming = flat_out[receive_bounds[source][0]:receive_bounds[source][1]]
    if outgoing.size and incoming.size:
        mpi_comm.Sendrecv(outgoing, dest, 5, incoming, source, 5)
    elif outgoing.size:
        mpi_comm.Send(outgoing, dest, 5)
    elif incoming.size:
        mpi_comm.Recv(incoming, source, 5)
    traffic += Traffic(outgoing.nbytes, incoming.nbytes)
return traffic
"""

WRONG = (
    Planted("pairwise_alltoall", "blocking Send then Recv at each step (deadlocks past the eager limit)", COLLECTIVES,
            "        mpi_comm.Sendrecv(outgoing, dest, _ALL_TO_ALL_TAG, incoming, source, _ALL_TO_ALL_TAG)\n",
            "        mpi_comm.Send(outgoing, dest, _ALL_TO_ALL_TAG)\n        mpi_comm.Recv(incoming, source, "
            "_ALL_TO_ALL_TAG)\n", "deadlock: ranks", limit=15),
    region("pairwise_alltoall", "MPI's built-in Alltoallv", COLLECTIVES, {"pairwise_alltoall": _ALLTOALL_BUILT_IN},
           "called MPI's Alltoallv"),
    region("pairwise_alltoall", "float64 scratch buffers in a float32 exchange", COLLECTIVES,
           {"pairwise_alltoall": _ALLTOALL_FLOAT64_WIRE}, "moved float64 in a float32 all-to-all"),
    Planted("pairwise_alltoall", "near miss: each received block off by 1e-9 relative", COLLECTIVES,
            "incoming, source, _ALL_TO_ALL_TAG)\n",
            "incoming, source, _ALL_TO_ALL_TAG)\n        incoming *= 1 + 1e-9\n", "out element"),
    Planted("pairwise_alltoall", "the own block never copied", COLLECTIVES,
            "    flat_out[mine_start:mine_stop] = flat_send[own_start:own_stop]\n", "",
            "nothing arrived in this slot"),
    region("pairwise_alltoall", "equal blocks assumed (n/N each)", COLLECTIVES,
           {"pairwise_alltoall": _ALLTOALL_EQUAL_BLOCKS}, "uneven blocks"),
)

ALTERNATIVES = (
    region("pairwise_alltoall", "every Irecv posted, then every Isend, then Wait", COLLECTIVES,
           {"pairwise_alltoall": _ALLTOALL_NONBLOCKING}, ""),
    region("pairwise_alltoall", "XOR partners on a power of two, else the other shift; empty blocks skipped",
           COLLECTIVES, {"pairwise_alltoall": _ALLTOALL_XOR_SKIPPING_EMPTY}, ""),
)
