"""The corpus of exercise recursive_doubling (Recursive-doubling allreduce, folding ranks beyond a power of two):
wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives they must
pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import COLLECTIVES, Planted, region
from minipar.course.planted.ring_allreduce import BUILT_IN_ALLREDUCE

WRONG = (
    Planted("recursive_doubling", "partner = rank XOR distance, ignoring the folded ranks", COLLECTIVES,
            "partner = 2 * partner_position + 1 if partner_position < extra else partner_position + extra",
            "partner = rank ^ distance", "Invalid rank has value 3", limit=15),
    Planted("recursive_doubling", "folded ranks never get the result back", COLLECTIVES,
            "    if rank < 2 * extra:\n        mpi_comm.Send(flat, rank - 1, tag)\n"
            "        traffic += Traffic(flat.nbytes, 0)\n",
            "", "did not finish", limit=15),
    Planted("recursive_doubling", "distance grows by one instead of doubling", COLLECTIVES,
            "        distance *= 2\n\n    if rank < 2 * extra:", "        distance += 1\n\n    if rank < 2 * extra:",
            "counted more than once"),
    region("recursive_doubling", "MPI's built-in Allreduce", COLLECTIVES,
           {"recursive_doubling_allreduce": BUILT_IN_ALLREDUCE.replace("modelled_traffic(\"reduce_scatter\"",
                                                                   "modelled_traffic(\"allreduce\"")},
           "called MPI's Allreduce"),
    Planted("recursive_doubling", "partners both send first (deadlocks past the eager limit)", COLLECTIVES,
            "        mpi_comm.Sendrecv(flat, partner, tag, incoming, partner, tag)\n",
            "        mpi_comm.Send(flat, partner, tag)\n        mpi_comm.Recv(incoming, partner, tag)\n",
            "deadlock: ranks"),
    Planted("recursive_doubling", "near miss: the result off by 1e-9 relative", COLLECTIVES,
            "        distance *= 2\n\n    if rank < 2 * extra:",
            "        distance *= 2\n    if op == 'sum':\n        flat *= 1 + 1e-9\n\n    if rank < 2 * extra:",
            "expected"),
    Planted("recursive_doubling", "a float64 scratch buffer in a float32 allreduce", COLLECTIVES,
            "    incoming = _scratch(flat, flat.size)\n    tag = _RECURSIVE_DOUBLING_TAG\n",
            "    incoming = flat.astype(float)\n    tag = _RECURSIVE_DOUBLING_TAG\n",
            "a buffer of its own dtype"),
)

ALTERNATIVES = (
    Planted("recursive_doubling", "each round with Isend/Irecv", COLLECTIVES,
            "        mpi_comm.Sendrecv(flat, partner, tag, incoming, partner, tag)\n",
            "        requests = [mpi_comm.Irecv(incoming, partner, tag), mpi_comm.Isend(flat, partner, tag)]\n"
            "        for request in requests:\n            request.Wait()\n", ""),
    Planted("recursive_doubling", "each round with Send/Recv, the lower rank sending first", COLLECTIVES,
            "        mpi_comm.Sendrecv(flat, partner, tag, incoming, partner, tag)\n",
            "        if rank < partner:\n            mpi_comm.Send(flat, partner, tag)\n"
            "            mpi_comm.Recv(incoming, partner, tag)\n        else:\n"
            "            mpi_comm.Recv(incoming, partner, tag)\n            mpi_comm.Send(flat, partner, tag)\n", ""),
)
