"""The corpus of exercise ring_allreduce (Ring allreduce = ring reduce-scatter + ring all-gather over Sendrecv):
wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives they must
pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import COLLECTIVES, Planted, region

_SEND_FIRST_RING = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
if size == 1:
    return traffic
bounds = block_bounds(flat.size, size)
incoming = flat[:bounds[0][1]].copy()
for step in range(size - 1):
    s0, s1 = bounds[(rank - step - 1) % size]
    r0, r1 = bounds[(rank - step - 2) % size]
    mpi_comm.Send(flat[s0:s1], (rank + 1) % size, 11)
    mpi_comm.Recv(incoming[:r1 - r0], (rank - 1) % size, 11)
    REDUCE_INTO[op](flat[r0:r1], incoming[:r1 - r0])
    traffic += Traffic((s1 - s0) * flat.itemsize, (r1 - r0) * flat.itemsize)
return traffic
"""
BUILT_IN_ALLREDUCE = """
from mpi4py import MPI
flat = _flat(buffer)
mpi_comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM if op == "sum" else MPI.MAX)
return modelled_traffic("reduce_scatter", mpi_comm.Get_rank(), mpi_comm.Get_size(), flat.size, flat.itemsize)
"""
_MIRRORED_REDUCE_SCATTER = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
if size == 1:
    return traffic
bounds = block_bounds(flat.size, size)
spare = flat[:bounds[0][1]].copy()
for step in range(size - 1):
    out_start, out_stop = bounds[(rank + step + 1) % size]    # to the left, r - 1
    in_start, in_stop = bounds[(rank + step + 2) % size]      # from the right, r + 1
    arrived = spare[:in_stop - in_start]
    mpi_comm.Sendrecv(flat[out_start:out_stop], (rank - 1) % size, 3, arrived, (rank + 1) % size, 3)
    REDUCE_INTO[op](flat[in_start:in_stop], arrived)
    traffic += Traffic((out_stop - out_start) * flat.itemsize, arrived.nbytes)
return traffic
"""
_MIRRORED_ALL_GATHER = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
for step in range(size - 1):
    out_start, out_stop = block_bounds(flat.size, size)[(rank + step) % size]
    in_start, in_stop = block_bounds(flat.size, size)[(rank + step + 1) % size]
    mpi_comm.Sendrecv(flat[out_start:out_stop], (rank - 1) % size, 4, flat[in_start:in_stop], (rank + 1) % size, 4)
    traffic += Traffic((out_stop - out_start) * flat.itemsize, (in_stop - in_start) * flat.itemsize)
return traffic
"""
_NONBLOCKING_REDUCE_SCATTER = """
from mpi4py import MPI
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
if size == 1:
    return traffic
bounds = block_bounds(flat.size, size)
incoming = flat[:bounds[0][1]].copy()
for step in range(size - 1):
    s0, s1 = bounds[(rank - step - 1) % size]
    r0, r1 = bounds[(rank - step - 2) % size]
    requests = [mpi_comm.Irecv(incoming[:r1 - r0], (rank - 1) % size, 5),
                mpi_comm.Isend(flat[s0:s1], (rank + 1) % size, 5)]
    MPI.Request.Waitall(requests)
    REDUCE_INTO[op](flat[r0:r1], incoming[:r1 - r0])
    traffic += Traffic((s1 - s0) * flat.itemsize, (r1 - r0) * flat.itemsize)
return traffic
"""
_NONBLOCKING_ALL_GATHER = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
bounds = block_bounds(flat.size, size)
for step in range(size - 1):
    s0, s1 = bounds[(rank - step) % size]
    r0, r1 = bounds[(rank - step - 1) % size]
    receiving = mpi_comm.Irecv(flat[r0:r1], (rank - 1) % size, 6)
    sending = mpi_comm.Isend(flat[s0:s1], (rank + 1) % size, 6)
    receiving.Wait()
    sending.Wait()
    traffic += Traffic((s1 - s0) * flat.itemsize, (r1 - r0) * flat.itemsize)
return traffic
"""
_EVEN_ODD_REDUCE_SCATTER = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
if size == 1:
    return traffic
bounds = block_bounds(flat.size, size)
incoming = flat[:bounds[0][1]].copy()
for step in range(size - 1):
    s0, s1 = bounds[(rank - step - 1) % size]
    r0, r1 = bounds[(rank - step - 2) % size]
    if rank % 2 == 0:     # even ranks send first, odd ranks receive first: no cycle of waiting sends
        mpi_comm.Send(flat[s0:s1], (rank + 1) % size, 8)
        mpi_comm.Recv(incoming[:r1 - r0], (rank - 1) % size, 8)
    else:
        mpi_comm.Recv(incoming[:r1 - r0], (rank - 1) % size, 8)
        mpi_comm.Send(flat[s0:s1], (rank + 1) % size, 8)
    REDUCE_INTO[op](flat[r0:r1], incoming[:r1 - r0])
    traffic += Traffic((s1 - s0) * flat.itemsize, (r1 - r0) * flat.itemsize)
return traffic
"""

WRONG = (
    Planted("ring_allreduce", "ring neighbours swapped in the reduce-scatter", COLLECTIVES,
            "right, left = (rank + 1) % size, (rank - 1) % size\n    incoming_space",
            "right, left = (rank - 1) % size, (rank + 1) % size\n    incoming_space",
            "every step must turn the same way"),
    Planted("ring_allreduce", "reduce-scatter block index off by one", COLLECTIVES,
            "send_start, send_stop = bounds[(rank - step - 1) % size]\n"
            "        receive_start, receive_stop = bounds[(rank - step - 2) % size]",
            "send_start, send_stop = bounds[(rank - step) % size]\n"
            "        receive_start, receive_stop = bounds[(rank - step - 1) % size]", "at step 0 rank 0 sent block 0"),
    Planted("ring_allreduce", "received block overwrites instead of adding", COLLECTIVES,
            "reduce_into(flat[receive_start:receive_stop], incoming)",
            "flat[receive_start:receive_stop] = incoming", "contributions missing"),
    Planted("ring_allreduce", "all-gather forwards a block it has not received yet", COLLECTIVES,
            "send_start, send_stop = bounds[(rank - step) % size]",
            "send_start, send_stop = bounds[(rank - step + 1) % size]", "at step s the ring sends block (r - s) mod N"),
    region("ring_allreduce", "ring of blocking sends: every rank sends first (deadlocks past the eager limit)",
           COLLECTIVES, {"ring_reduce_scatter": _SEND_FIRST_RING}, "deadlock: ranks"),
    region("ring_allreduce", "MPI's built-in with made-up traffic", COLLECTIVES,
           {"ring_reduce_scatter": BUILT_IN_ALLREDUCE}, "called MPI's Allreduce"),
    Planted("ring_allreduce", "near miss: each hop adds 1e-9 relative", COLLECTIVES,
            "reduce_into(flat[receive_start:receive_stop], incoming)",
            "reduce_into(flat[receive_start:receive_stop], incoming * (1 + 1e-9))", "expected"),
    Planted("ring_allreduce", "a float64 scratch buffer in a float32 ring", COLLECTIVES,
            "incoming_space = _scratch(flat, bounds[0][1] - bounds[0][0])",
            "incoming_space = _scratch(flat.astype('float64'), bounds[0][1] - bounds[0][0])", "buffer of its own dtype"),
    Planted("ring_allreduce", "equal blocks of n // N (the remainder never reduced when N does not divide n)",
            COLLECTIVES, "    bounds = block_bounds(flat.size, size)\n    right, left = (rank + 1) % size, (rank - 1) % size\n"
            "    incoming_space",
            "    block = flat.size // size\n    bounds = [(i * block, (i + 1) * block) for i in range(size)]\n"
            "    right, left = (rank + 1) % size, (rank - 1) % size\n    incoming_space",
            "which is not one of its blocks",
            more=(("    bounds = block_bounds(flat.size, size)\n    right, left = (rank + 1) % size, (rank - 1) % size\n"
                   "    for step",
                   "    block = flat.size // size\n    bounds = [(i * block, (i + 1) * block) for i in range(size)]\n"
                   "    right, left = (rank + 1) % size, (rank - 1) % size\n    for step"),)),
)

ALTERNATIVES = (
    region("ring_allreduce", "the mirrored ring (to r - 1, from r + 1), Sendrecv", COLLECTIVES,
           {"ring_reduce_scatter": _MIRRORED_REDUCE_SCATTER, "ring_all_gather": _MIRRORED_ALL_GATHER}, ""),
    region("ring_allreduce", "Isend/Irecv with Waitall and Wait", COLLECTIVES,
           {"ring_reduce_scatter": _NONBLOCKING_REDUCE_SCATTER, "ring_all_gather": _NONBLOCKING_ALL_GATHER}, ""),
    region("ring_allreduce", "blocking Send/Recv ordered even/odd", COLLECTIVES,
           {"ring_reduce_scatter": _EVEN_ODD_REDUCE_SCATTER}, ""),
)
