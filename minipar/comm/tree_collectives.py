"""Collectives on a binomial tree, built by hand from point-to-point messages: broadcast, reduce,
and allreduce as a reduce then a broadcast.

MPICH runs ``MPI_Bcast`` and ``MPI_Reduce`` this way for short messages: $⌈lg N⌉$ rounds, the
number of ranks holding the data doubling every round (Thakur, Rabenseifner & Gropp 2005). The
conventions are those of ``collectives.py`` (raw mpi4py communicators, contiguous host buffers
worked on in place, ``op`` "sum" or "max", a tag per collective); which rank is whose parent and
children is ``traffic.binomial_parent_distance`` and ``traffic.binomial_children``.
"""
from minipar.comm.collectives import REDUCE_INTO, _flat, _scratch
from minipar.comm.traffic import Traffic, binomial_children, binomial_parent_distance

BROADCAST_TAG = 7104
REDUCE_TAG = 7105


def tree_allreduce(mpi_comm, buffer, op="sum"):
    """Allreduce as a binomial-tree reduce to rank 0 followed by a binomial-tree broadcast.

    The simplest correct allreduce. Cost $2⌈lg N⌉(α + nβ) + ⌈lg N⌉nγ$ (Thakur,
    Rabenseifner & Gropp 2005): the root's links carry $⌈lg N⌉ × n$ each way,
    so it scales worst of the three for large $n$.
    """
    return tree_reduce(mpi_comm, buffer, 0, op) + tree_broadcast(mpi_comm, buffer, 0)


def tree_broadcast(mpi_comm, buffer, root=0):
    """Binomial-tree broadcast, in place: ``buffer`` on ``root`` is copied to every rank.

    Re-creates ``MPI_Bcast`` as MPICH runs it for short messages. Number
    ranks relative to the root. A rank receives once, from the rank that
    differs in its lowest set bit, then forwards to relative $+ 2^j$ for each
    smaller power of two: the number of ranks holding the data doubles every
    round, so $⌈lg N⌉$ rounds reach everyone.

    Every non-root rank receives $n$ bytes; the root sends $⌈lg N⌉ × n$. Cost
    $⌈lg N⌉(α + nβ)$ (Thakur, Rabenseifner & Gropp 2005).
    """
    flat = _flat(buffer)
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    relative = (rank - root) % size
    traffic = Traffic()
    if relative != 0:
        parent = (rank - binomial_parent_distance(relative, size)) % size
        mpi_comm.Recv(flat, parent, BROADCAST_TAG)
        traffic += Traffic(0, flat.nbytes)
    for child in binomial_children(relative, size):
        mpi_comm.Send(flat, (child + root) % size, BROADCAST_TAG)
        traffic += Traffic(flat.nbytes, 0)
    return traffic


def tree_reduce(mpi_comm, buffer, root=0, op="sum"):
    """Binomial-tree reduce, in place: afterwards ``buffer`` on ``root`` holds the reduction.

    Re-creates ``MPI_Reduce``: the broadcast tree run backwards. Each rank
    receives from its children nearest first, reduces, and sends the partial
    result to its parent. On ranks other than the root the buffer is left
    holding that partial result.

    Every non-root rank sends $n$ bytes once; the root receives $⌈lg N⌉ × n$.
    Cost $⌈lg N⌉(α + nβ + nγ)$ (Thakur, Rabenseifner & Gropp 2005).
    """
    reduce_into = REDUCE_INTO[op]
    flat = _flat(buffer)
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    relative = (rank - root) % size
    traffic = Traffic()
    children = binomial_children(relative, size)
    incoming = _scratch(flat, flat.size) if children else None
    for child in reversed(children):
        mpi_comm.Recv(incoming, (child + root) % size, REDUCE_TAG)
        reduce_into(flat, incoming)
        traffic += Traffic(0, incoming.nbytes)
    if relative != 0:
        parent = (rank - binomial_parent_distance(relative, size)) % size
        mpi_comm.Send(flat, parent, REDUCE_TAG)
        traffic += Traffic(flat.nbytes, 0)
    return traffic
