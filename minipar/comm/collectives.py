"""Collectives built by hand from point-to-point messages.

MPI's ``Allreduce``, ``Allgather``, ``Reduce_scatter`` and ``Alltoall(v)`` are
black boxes. The functions here re-create them from ``Send``, ``Recv`` and
``Sendrecv`` so that a reader can follow every message (``Bcast`` and ``Reduce``
on a binomial tree: ``tree_collectives.py``). Each returns the
``Traffic`` it caused on this rank, counted message by message, so the byte
counts are exact rather than modelled.

Conventions:

- ``mpi_comm`` is a raw mpi4py communicator; every rank of it must call the
  same function with buffers of the same size and dtype, as with MPI.
- Buffers are contiguous host (NumPy) arrays, because MPI reads host memory;
  ``minipar.comm.Communicator`` stages backend arrays through host memory and
  calls these. They work in place and any shape is treated as flat.
- ``op`` is ``"sum"`` or ``"max"``.
- The α–β costs in the docstrings count, for a message of $n$ bytes, $α$ per
  message (latency), $β$ per byte moved and $γ$ per byte reduced (Thakur,
  Rabenseifner & Gropp 2005, "Optimization of collective communication
  operations in MPICH").
- Each collective sends with its own tag, so its messages cannot be taken by
  a point-to-point receive that the caller posted on the same communicator
  with another tag.
"""
from minipar.comm.traffic import Traffic, alltoall_traffic, block_bounds, bounds_from_counts, modelled_traffic
from minipar.errors import ShapeError

# Traffic and the block and volume helpers live in traffic.py, the trees in tree_collectives.py; the
# first are offered here too, where the lessons and the course read the collectives.
__all__ = ["REDUCE_INTO", "Traffic", "alltoall_traffic", "block_bounds", "bounds_from_counts", "modelled_traffic",
           "pairwise_alltoall", "recursive_doubling_allreduce", "ring_all_gather", "ring_allreduce",
           "ring_reduce_scatter"]

_REDUCE_SCATTER_TAG = 7101
_ALL_GATHER_TAG = 7102
_RECURSIVE_DOUBLING_TAG = 7103


def _sum_into(accumulator, incoming):
    accumulator += incoming


def _max_into(accumulator, incoming):
    # Clipping from below by the other operand is the elementwise maximum,
    # written in place through the array's own method (host arrays, no xp).
    accumulator.clip(min=incoming, out=accumulator)


REDUCE_INTO = {"sum": _sum_into, "max": _max_into}


def _flat(buffer):
    # reshape(-1) of a strided view would be a copy, and in-place results would vanish into it.
    if not buffer.flags.c_contiguous:
        raise ShapeError(f"collectives work in place on C-contiguous buffers; got a strided {buffer.shape} view")
    return buffer.reshape(-1)


# dtype -> the largest scratch array any collective has needed so far. Reusing it
# saves allocating (and faulting in) fresh pages on every call. Safe because a
# rank runs one hand-built collective at a time and each uses one scratch array.
_scratch_space = {}


def _scratch(flat, count):
    """A reusable host array of ``count`` elements of ``flat``'s dtype; contents undefined."""
    space = _scratch_space.get(flat.dtype)
    if space is None or space.size < count:
        space = flat[:count].copy()  # allocates an array of the buffer's own type, no xp needed
        _scratch_space[flat.dtype] = space
    return space[:count]


def ring_reduce_scatter(mpi_comm, buffer, op="sum"):
    """Ring reduce-scatter, in place: afterwards block ``rank`` of ``buffer`` holds the reduction.

    Re-creates ``MPI_Reduce_scatter_block``. The buffer is cut into $N$ blocks
    (``block_bounds``). Ranks form a ring; at step $s = 0 … N−2$ rank $r$ sends
    block $(r−s−1) mod N$ to rank $r+1$ and receives block $(r−s−2) mod N$ from
    rank $r−1$, adding it into its own copy. Each block travels once round the
    ring collecting one contribution per hop, and the block that arrives
    last at rank $r$ is block $r$, now complete. Other blocks hold partial sums.

    Rank $r$ sends every block except block $r$: $(N−1)/N$ of the data when $N$
    divides it. Cost $(N−1)α + ((N−1)/N)nβ + ((N−1)/N)nγ$
    (Patarasuk & Yuan 2009; Thakur, Rabenseifner & Gropp 2005).
    """
    ### BEGIN SOLUTION
    reduce_into = REDUCE_INTO[op]
    flat = _flat(buffer)
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    traffic = Traffic()
    if size == 1:
        return traffic
    bounds = block_bounds(flat.size, size)
    right, left = (rank + 1) % size, (rank - 1) % size
    incoming_space = _scratch(flat, bounds[0][1] - bounds[0][0])
    for step in range(size - 1):
        send_start, send_stop = bounds[(rank - step - 1) % size]
        receive_start, receive_stop = bounds[(rank - step - 2) % size]
        outgoing = flat[send_start:send_stop]
        incoming = incoming_space[: receive_stop - receive_start]
        mpi_comm.Sendrecv(outgoing, right, _REDUCE_SCATTER_TAG, incoming, left, _REDUCE_SCATTER_TAG)
        reduce_into(flat[receive_start:receive_stop], incoming)
        traffic += Traffic(outgoing.nbytes, incoming.nbytes)
    return traffic
    ### END SOLUTION


def ring_all_gather(mpi_comm, buffer):
    """Ring all-gather, in place: block ``rank`` of ``buffer`` is copied to every rank.

    Re-creates ``MPI_Allgather``. On entry rank $r$ owns block $r$. At step
    $s = 0 … N−2$ rank $r$ sends block $(r−s) mod N$ to rank $r+1$ and receives block
    $(r−s−1) mod N$ from rank $r−1$, straight into place: each step forwards the
    block that arrived in the step before. After $N−1$ steps every block has
    been everywhere.

    Rank $r$ sends every block except block $r+1$: $(N−1)/N$ of the gathered data
    when $N$ divides it. Cost $(N−1)α + ((N−1)/N)nβ$, no reduction
    (Patarasuk & Yuan 2009; Thakur, Rabenseifner & Gropp 2005).
    """
    ### BEGIN SOLUTION
    flat = _flat(buffer)
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    traffic = Traffic()
    if size == 1:
        return traffic
    bounds = block_bounds(flat.size, size)
    right, left = (rank + 1) % size, (rank - 1) % size
    for step in range(size - 1):
        send_start, send_stop = bounds[(rank - step) % size]
        receive_start, receive_stop = bounds[(rank - step - 1) % size]
        outgoing, incoming = flat[send_start:send_stop], flat[receive_start:receive_stop]
        mpi_comm.Sendrecv(outgoing, right, _ALL_GATHER_TAG, incoming, left, _ALL_GATHER_TAG)
        traffic += Traffic(outgoing.nbytes, incoming.nbytes)
    return traffic
    ### END SOLUTION


def ring_allreduce(mpi_comm, buffer, op="sum"):
    """Ring allreduce, in place: a ring reduce-scatter followed by a ring all-gather.

    Re-creates ``MPI_Allreduce`` the way NCCL and Baidu's ring allreduce do.
    The reduce-scatter leaves rank r holding complete block r, which is
    exactly what the all-gather starts from.

    Each rank sends, and receives, $2(N−1)/N$ of the data, independent of N in
    the limit: the bandwidth-optimal amount (Patarasuk & Yuan 2009). Cost
    $2(N−1)α + 2((N−1)/N)nβ + ((N−1)/N)nγ$ (Thakur, Rabenseifner & Gropp 2005;
    NVIDIA nccl-tests doc/PERFORMANCE.md for the $2(N−1)/N$ "bus bandwidth" factor).
    Every block is reduced on one rank and then copied, so all ranks end with
    bitwise identical results.
    """
    return ring_reduce_scatter(mpi_comm, buffer, op) + ring_all_gather(mpi_comm, buffer)


def recursive_doubling_allreduce(mpi_comm, buffer, op="sum"):
    """Recursive-doubling allreduce, in place.

    Re-creates ``MPI_Allreduce`` as MPICH runs it for short messages. With $N$ a
    power of two, in round $k = 0 … lg N − 1$ each rank swaps its whole buffer
    with the rank whose number differs in bit $k$ and reduces; after $lg N$ rounds
    every rank holds everything. Both partners reduce the same two operands
    (in swapped order, and + is commutative), so results are bitwise identical.

    Other $N$: let $P$ be the largest power of two $≤ N$ and $E = N − P$. First, among
    ranks $0 … 2E−1$ each even rank sends its buffer to the odd rank above it
    and sits out; the $P$ remaining ranks run the rounds above; last, each odd
    rank below $2E$ sends the result back to its even neighbour. This folding
    adds two steps (Thakur, Rabenseifner & Gropp 2005, section 4).

    Cost $lg N · α + n lg N · β + n lg N · γ$ for $N$ a power of two (Thakur,
    Rabenseifner & Gropp 2005): few messages, so good for small $n$, but every
    round moves the whole buffer, so worse than the ring for large $n$.
    """
    ### BEGIN SOLUTION
    reduce_into = REDUCE_INTO[op]
    flat = _flat(buffer)
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    traffic = Traffic()
    if size == 1:
        return traffic
    power = 1 << (size.bit_length() - 1)
    extra = size - power
    incoming = _scratch(flat, flat.size)
    tag = _RECURSIVE_DOUBLING_TAG

    if rank < 2 * extra and rank % 2 == 0:  # folded away: hand the data up, wait for the answer
        mpi_comm.Send(flat, rank + 1, tag)
        mpi_comm.Recv(flat, rank + 1, tag)
        return Traffic(flat.nbytes, flat.nbytes)
    if rank < 2 * extra:
        mpi_comm.Recv(incoming, rank - 1, tag)
        reduce_into(flat, incoming)
        traffic += Traffic(0, incoming.nbytes)
    position = rank // 2 if rank < 2 * extra else rank - extra  # among the P active ranks

    distance = 1
    while distance < power:
        partner_position = position ^ distance
        partner = 2 * partner_position + 1 if partner_position < extra else partner_position + extra
        mpi_comm.Sendrecv(flat, partner, tag, incoming, partner, tag)
        reduce_into(flat, incoming)
        traffic += Traffic(flat.nbytes, incoming.nbytes)
        distance *= 2

    if rank < 2 * extra:
        mpi_comm.Send(flat, rank - 1, tag)
        traffic += Traffic(flat.nbytes, 0)
    return traffic
    ### END SOLUTION


# ---- all-to-all: every rank sends a different block to every other rank --------------------------

_ALL_TO_ALL_TAG = 7106


def pairwise_alltoall(mpi_comm, send, out, send_bounds, receive_bounds):
    """Pairwise-exchange all-to-all: the slice ``send_bounds[j]`` of ``send`` goes to rank j, and
    what rank i sends lands in the slice ``receive_bounds[i]`` of ``out``.

    Re-creates ``MPI_Alltoall`` / ``MPI_Alltoallv`` as MPICH runs them for long messages. The
    bounds are (start, stop) element offsets into the flat buffers, one pair per rank, so equal
    blocks (all-to-all) and uneven ones (all-to-allv) are the same loop. Rank r first copies
    its own block, then at step $s = 1 … N−1$ sends to rank $r+s$ and receives from rank $r−s$
    (mod $N$) in one ``Sendrecv``: at every step each rank has exactly one partner each way, so no
    rank waits on a busy one, and after $N−1$ steps every pair has met once.

    Rank $r$ sends everything but its own block: $(N−1)/N$ of the data when the blocks are equal.
    Cost $(N−1)α + ((N−1)/N)nβ$, nothing reduced (Thakur, Rabenseifner & Gropp 2005).
    Unlike the ring collectives no block is forwarded: each travels once, straight to its owner.

    The course's contract (exercise pairwise_alltoall): point-to-point messages only, $N−1$ exchanges
    per call, each with a distinct partner and each block sent once in ``send``'s own dtype (empty
    blocks included or skipped on both sides alike), an order that cannot deadlock when every send
    is synchronous, and the ``Traffic`` of what moved.
    """
    ### BEGIN SOLUTION
    flat_send, flat_out = _flat(send), _flat(out)
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    own_start, own_stop = send_bounds[rank]
    mine_start, mine_stop = receive_bounds[rank]
    if own_stop - own_start != mine_stop - mine_start:
        raise ShapeError(f"all-to-all: rank {rank} sends itself {own_stop - own_start} elements but expects "
                         f"{mine_stop - mine_start}")
    flat_out[mine_start:mine_stop] = flat_send[own_start:own_stop]
    traffic = Traffic()
    for step in range(1, size):
        dest, source = (rank + step) % size, (rank - step) % size
        outgoing = flat_send[send_bounds[dest][0]:send_bounds[dest][1]]
        incoming = flat_out[receive_bounds[source][0]:receive_bounds[source][1]]
        mpi_comm.Sendrecv(outgoing, dest, _ALL_TO_ALL_TAG, incoming, source, _ALL_TO_ALL_TAG)
        traffic += Traffic(outgoing.nbytes, incoming.nbytes)
    return traffic
    ### END SOLUTION


