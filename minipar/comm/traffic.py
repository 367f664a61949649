"""What a collective moves: the ``Traffic`` it counts, how it cuts a buffer into blocks, which
ranks a binomial tree links, and the bytes each textbook algorithm would move.

The hand-built collectives (``collectives.py``, ``tree_collectives.py``) count their ``Traffic``
message by message; ``modelled_traffic`` and ``alltoall_traffic`` give the same figures without
moving anything, which is how the Communicator counts MPI's built-ins (whose real traffic MPI
does not report) and how the planner (``minipar/plan/traffic.py``) predicts a step's bytes. The
volumes: ring reduce-scatter and all-gather $(N−1)/N·n$ each, ring allreduce $2(N−1)/N·n$,
binomial tree $⌈lg N⌉·n$ on the root's links (Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009).
"""
import functools
from dataclasses import dataclass


@dataclass
class Traffic:
    """Bytes this rank put on the wire and took off it during one collective."""

    bytes_sent: int = 0
    bytes_received: int = 0

    def __add__(self, other):
        return Traffic(self.bytes_sent + other.bytes_sent, self.bytes_received + other.bytes_received)


def block_bounds(count, nblocks):
    """``(start, stop)`` of ``nblocks`` contiguous blocks covering ``count`` elements.

    Blocks differ in length by at most one: the first ``count % nblocks`` get
    the extra element, so block 0 is always the largest. When ``nblocks``
    divides ``count`` every block holds exactly ``count / nblocks``.
    """
    base, extra = divmod(count, nblocks)
    bounds, start = [], 0
    for index in range(nblocks):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def bounds_from_counts(counts, row_size=1):
    """(start, stop) element offsets of consecutive blocks of ``counts[j]`` rows of ``row_size`` elements."""
    bounds, start = [], 0
    for count in counts:
        stop = start + int(count) * row_size
        bounds.append((start, stop))
        start = stop
    return bounds


def binomial_parent_distance(relative, size):
    """The distance to the parent in a binomial tree (lowest set bit), or the tree's span for the root."""
    distance = 1
    while distance < size and not relative & distance:
        distance *= 2
    return distance


def binomial_children(relative, size):
    """Ranks (relative to the root) that ``relative`` sends to in a binomial broadcast, farthest first."""
    distance = binomial_parent_distance(relative, size) // 2
    children = []
    while distance >= 1:
        if relative + distance < size:
            children.append(relative + distance)
        distance //= 2
    return children


def modelled_traffic(collective, rank, size, count, itemsize, root=0):
    """The bytes the hand-built algorithm would move on this rank, without moving them.

    Used to count MPI's built-in collectives, whose real traffic MPI does not
    report: ring volumes for ``"allreduce"``, ``"reduce_scatter"`` and
    ``"allgather"`` (``count`` is the full, gathered size), binomial-tree
    volumes for ``"broadcast"`` and ``"reduce"``. These are textbook figures;
    the MPI library may pick another algorithm and move different bytes.
    """
    return Traffic(*_modelled_bytes(collective, rank, size, count, itemsize, root))


# A training step makes the same few calls every micro-batch (a layer's allreduce, a stage's
# gather), and this model sat on every one of them: 5-8% of a rank's CPU in the 8-rank main job
# (benchmarks/profile_ranks.py). Each distinct call is worked out once.
@functools.lru_cache(maxsize=4096)
def _modelled_bytes(collective, rank, size, count, itemsize, root):
    """``(bytes sent, bytes received)`` of ``modelled_traffic``."""
    if size == 1:
        return 0, 0
    block_sizes = [stop - start for start, stop in block_bounds(count, size)]
    # Ring reduce-scatter: rank r sends all blocks but r, receives all but r−1.
    reduce_scatter = Traffic(count - block_sizes[rank], count - block_sizes[(rank - 1) % size])
    # Ring all-gather: rank r sends all blocks but r+1, receives all but r.
    all_gather = Traffic(count - block_sizes[(rank + 1) % size], count - block_sizes[rank])
    relative = (rank - root) % size
    fan_out = len(binomial_children(relative, size))
    from_parent = 0 if relative == 0 else 1
    elements = {
        "reduce_scatter": reduce_scatter,
        "allgather": all_gather,
        "allreduce": reduce_scatter + all_gather,
        "broadcast": Traffic(fan_out * count, from_parent * count),
        "reduce": Traffic(from_parent * count, fan_out * count),
    }[collective]
    return elements.bytes_sent * itemsize, elements.bytes_received * itemsize


def alltoall_traffic(rank, send_bounds, receive_bounds, itemsize):
    """The bytes a direct exchange moves on this rank: every block but its own, each way.

    What the pairwise exchange counts message by message, and the model used to count MPI's
    built-in ``Alltoall(v)``, which may route small messages through other ranks (Bruck's
    algorithm) and so move more.
    """
    sent = sum(stop - start for j, (start, stop) in enumerate(send_bounds) if j != rank)
    received = sum(stop - start for i, (start, stop) in enumerate(receive_bounds) if i != rank)
    return Traffic(sent * itemsize, received * itemsize)
