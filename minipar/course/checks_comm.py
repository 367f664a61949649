"""Checks for the hand-built collectives (minipar/comm/collectives.py): values and contract.

Values. Element $j$ of rank $r$ is $(1 + j mod 4)·10^r$ in float64 (``digit_data``: a wrong sum
names the ranks missing or doubled) and $(1 + j mod 4)·2^r$ in float32; both are integers, so
every order of summation gives the exact sum and the comparison can be tight (a result
off by 1e-9 relative fails). Each check calls the function on several buffers in a row, as
training does step after step: $n = 3N + 1$ (blocks of unequal size), $n = N − 1$ (fewer
elements than ranks: some blocks are empty), $n$ large (far above MPI's eager limit), in
float64 and float32, and the dtype must stay what it was.

Contract, read from a ``Spy`` on the communicator (``spy.py``): a hand-built collective calls
no MPI collective; the ring sends $N − 1$ messages per phase, each one block ($⌊n/N⌋$ or $⌈n/N⌉$
elements) of the buffer's own dtype, all to one neighbour and received from the other (either
direction is a ring); the ``Traffic`` returned is what the spy saw moving. Sends are
synchronous (``Ssend``), so an ordering that needs MPI to buffer a message deadlocks here on
every size, as it would in a real run with large blocks; such a check ends at its short limit
with the line each rank waits on.
"""
import numpy as np

from minipar.course.checking import Check, CheckFailure, agreed, compare, digits_hint, require
from minipar.course.spy import Spy

LIMIT = 12.0   # seconds: every hand-built collective here finishes in well under one on 8 ranks


def _collectives():
    from minipar.comm import collectives

    return collectives


def cases(size):
    """(count, dtype) of the buffers one check passes in a row: large, fewer than N, unequal blocks."""
    return [(40_000 + 2 * size + 1, np.float64), (max(size - 1, 1), np.float32), (3 * size + 1, np.float64),
            (5 * size + 3, np.float32)]


def rank_data(rank, count, dtype):
    """Integers, so any order of summation is exact: (1 + j mod 4)·10^r (float64) or ·2^r (float32)."""
    base = 10.0 if dtype == np.float64 else 2.0
    return ((1 + np.arange(count) % 4) * base ** rank).astype(dtype)


def summed(size, count, dtype):
    return sum(rank_data(rank, count, dtype).astype(np.float64) for rank in range(size)).astype(dtype)


def _hint(size, dtype):
    return digits_hint(size) if dtype == np.float64 else None


def _block_sizes(count, size):
    return {count // size, -(-count // size)}


def check_messages(spy, what, rank, size, count, dtype, phases, traffic, traffic_too=True):
    """The ring's contract on this rank's notes; raises CheckFailure naming the first breach. Run first
    when the values are wrong too: a broken contract (a built-in, a wrong dtype) is the likelier cause."""
    used = sorted({call.method for call in spy.collectives()})
    require(not used, f"rank {rank}: {what} called MPI's {', '.join(used)}: a hand-built collective moves its data "
                      "with point-to-point messages only (Send/Recv, Sendrecv or Isend/Irecv)")
    sends, receives = spy.sends(), spy.receives()
    if size == 1:
        require(not sends and not receives, f"rank {rank}: {what} on one rank sent {len(sends)} messages; "
                                            "with N = 1 there is nothing to move")
    else:
        expected = phases * (size - 1)
        wanted = "exactly" if count >= size else "at most"
        require(len(sends) == expected if count >= size else len(sends) <= expected,
                f"rank {rank}: {what} sent {len(sends)} messages on N = {size} ranks (n = {count}), expected "
                f"{wanted} {expected}: {phases} × (N − 1), one block per step")
        neighbours = {(rank + 1) % size: (rank - 1) % size, (rank - 1) % size: (rank + 1) % size}
        destinations = {call.peer for call in sends}
        require(len(destinations) <= 1 and destinations <= set(neighbours),
                f"rank {rank}: {what} sent to ranks {sorted(destinations)}; in a ring every message goes to one "
                f"neighbour, r + 1 = {(rank + 1) % size} (or, turning the other way, r − 1 = {(rank - 1) % size})")
        if destinations:
            source = neighbours[next(iter(destinations))]
            sources = {call.peer for call in receives}
            require(sources <= {source}, f"rank {rank}: {what} sends to rank {next(iter(destinations))} but "
                                         f"receives from ranks {sorted(sources)}: the ring receives from the other "
                                         f"neighbour, rank {source} only")
        for call in sends + receives:
            require(call.elements in _block_sizes(count, size),
                    f"rank {rank}: {what} moved a message of {call.elements} elements ({call.method}); each message "
                    f"is one block, ⌊n/N⌋ or ⌈n/N⌉ = {sorted(_block_sizes(count, size))} elements for n = {count}")
            require(call.dtype == np.dtype(dtype).name,
                    f"rank {rank}: {what} moved {call.dtype} in a {np.dtype(dtype).name} collective ({call.method}): "
                    "messages carry the buffer's own dtype (a scratch buffer of another dtype doubles or halves "
                    "the bytes and changes the rounding)")
    if not traffic_too:
        return
    sent, received = sum(call.nbytes for call in sends), sum(call.nbytes for call in receives)
    reported = (getattr(traffic, "bytes_sent", None), getattr(traffic, "bytes_received", None))
    require(reported == (sent, received),
            f"rank {rank}: {what} returned Traffic(bytes_sent={reported[0]}, bytes_received={reported[1]}), but its "
            f"messages moved {sent} bytes out and {received} in: count what you send and receive, message by message"
            " (the data were right)")


def _ring_hint(spy, rank, size, first_block, count):
    """Where this rank's sends first left the ring's schedule, read from the spy's notes."""
    bounds = _collectives().block_bounds(count, size)
    starts = {start: block for block, (start, stop) in enumerate(bounds) if stop > start}
    for step, call in enumerate(spy.sends()[:size - 1]):   # the first phase
        direction = 1 if call.peer == (rank + 1) % size else -1
        expected = (rank - direction * (step + first_block)) % size
        block = starts.get(call.offset)
        if call.offset is not None and block is None and call.peer in ((rank + 1) % size, (rank - 1) % size):
            return (f"at step {step} rank {rank} sent elements [{call.offset}, {call.offset + call.elements}) of the "
                    f"buffer, which is not one of its blocks: block_bounds(n = {count}, N = {size}) = "
                    f"{[tuple(b) for b in bounds]}; when N does not divide n the first n mod N blocks hold one "
                    "element more than the others, and every rank must cut the buffer the same way")
        if call.peer not in ((rank + 1) % size, (rank - 1) % size) or (block is not None and block != expected):
            shown = f"block {block}" if block is not None else "a buffer that is not one block of it"
            sign = "-" if direction == 1 else "+"
            rule = f"(r {sign} s {sign} {first_block}) mod N" if first_block else f"(r {sign} s) mod N"
            to, source = ("r + 1", "r - 1") if direction == 1 else ("r - 1", "r + 1")
            return (f"at step {step} rank {rank} sent {shown} to rank {call.peer}; at step s the ring sends block "
                    f"{rule} = {expected} to {to} = {(rank + direction) % size} and receives from {source} = "
                    f"{(rank - direction) % size}; either direction is a ring, but every step must turn the same way")
    return ""


def _run(spy, function, *args, hint=lambda: ""):
    """Call the student's function; an exception comes back with where the messages left the schedule."""
    try:
        return function(spy, *args)
    except CheckFailure:
        raise
    except Exception as error:
        extra = hint()
        if not extra:
            raise
        lines = str(error).strip().splitlines() or [""]
        raise CheckFailure(f"raised {type(error).__name__}: {lines[-1]}\n{extra}") from error


def _phase_check(name, first_block, prepare, expected_of, phases):
    """A ring phase (or the whole allreduce) on every case of ``cases``, one call after another."""

    def check(comm):
        rank, size = comm.Get_rank(), comm.Get_size()
        def one_case(count, dtype):
            buffer = prepare(rank, size, count, dtype)
            spy = Spy(comm, base=buffer)
            function = getattr(_collectives(), name)
            traffic = _run(spy, function, buffer,
                           hint=lambda: _ring_hint(spy, rank, size, first_block, count))
            what = f"{name} ({np.dtype(dtype).name}, n = {count})"
            require(buffer.dtype == dtype, f"rank {rank}: {what} changed the buffer's dtype to {buffer.dtype}")
            region, expected, formula = expected_of(rank, size, count, dtype)
            try:
                compare(f"rank {rank}: {what}, {formula[0]}, element", buffer[region], expected, formula[1],
                        _hint(size, dtype))
            except CheckFailure as failure:
                check_messages(spy, what, rank, size, count, dtype, phases, None, traffic_too=False)
                extra = _ring_hint(spy, rank, size, first_block, count)
                raise CheckFailure(f"{failure}\n{extra}" if extra else str(failure)) from None
            check_messages(spy, what, rank, size, count, dtype, phases, traffic)

        for count, dtype in cases(size):
            agreed(comm, one_case, count, dtype)

    return check


def _data(rank, size, count, dtype):
    return rank_data(rank, count, dtype)


def _own(rank, size, count):
    start, stop = _collectives().block_bounds(count, size)[rank]
    return slice(start, stop)


def _reduce_scatter_expected(rank, size, count, dtype):
    own = _own(rank, size, count)
    return own, summed(size, count, dtype)[own], (f"block {rank} (elements {own.start}:{own.stop})",
                                                   "the sum over all ranks of their element")


def _gather_prepare(rank, size, count, dtype):
    buffer = np.full(count, -1, dtype=dtype)       # only the own block is known on entry
    own = _own(rank, size, count)
    buffer[own] = summed(size, count, dtype)[own]
    return buffer


def _gather_expected(rank, size, count, dtype):
    return slice(None), summed(size, count, dtype), ("the buffer", "block b comes from rank b; -1 means nothing "
                                                                   "arrived")


def _allreduce_expected(rank, size, count, dtype):
    return slice(None), summed(size, count, dtype), ("the buffer", "the sum over all ranks of their element")


def check_max(function_name):
    """op='max' on unequal data: the largest of every rank's element, on every rank."""

    def check(comm):
        rank, size = comm.Get_rank(), comm.Get_size()
        count = 3 * size + 1
        peaks = np.array([float((rank * 7 + j * 3) % (size + 2)) for j in range(count)])
        getattr(_collectives(), function_name)(Spy(comm), peaks, op="max")
        expected = np.max([[float((r * 7 + j * 3) % (size + 2)) for j in range(count)] for r in range(size)], axis=0)
        compare(f"rank {rank}: buffer after {function_name}(op='max'), element", peaks, expected,
                "the largest of every rank's element, (7r + 3j) mod (N+2) on rank r")

    return check


def check_recursive_doubling(comm):
    """Sums on every case, and the contract: $⌈lg N⌉ + 1$ messages at most, each the whole buffer."""
    rank, size = comm.Get_rank(), comm.Get_size()
    function = _collectives().recursive_doubling_allreduce
    def one_case(count, dtype):
        buffer = rank_data(rank, count, dtype)
        spy = Spy(comm)
        traffic = function(spy, buffer)
        what = f"recursive_doubling_allreduce ({np.dtype(dtype).name}, n = {count})"
        require(buffer.dtype == dtype, f"rank {rank}: {what} changed the buffer's dtype to {buffer.dtype}")
        compare(f"rank {rank}: buffer after {what}, element", buffer, summed(size, count, dtype),
                "the sum over all ranks of their element", _hint(size, dtype))
        used = sorted({call.method for call in spy.collectives()})
        require(not used, f"rank {rank}: {what} called MPI's {', '.join(used)}: build it from point-to-point "
                          "messages only")
        rounds = (size - 1).bit_length()              # ⌈lg N⌉
        power = 1 << (size.bit_length() - 1)
        sends = spy.sends()
        limit = rounds + (1 if power != size else 0)
        require(len(sends) <= limit,
                f"rank {rank}: {what} sent {len(sends)} messages on N = {size} ranks; recursive doubling sends "
                f"at most lg P + 1 = {limit} (one per round, plus the fold when N is not a power of two)")
        for call in sends + spy.receives():
            require(call.elements == count and call.dtype == np.dtype(dtype).name,
                    f"rank {rank}: {what} moved a message of {call.elements} {call.dtype} elements ({call.method}) "
                    f"to or from rank {call.peer}; every round swaps the whole buffer, {count} "
                    f"{np.dtype(dtype).name} elements")
        if size == power:
            partners = sorted({call.peer for call in sends})
            expected = sorted({rank ^ (1 << k) for k in range(rounds)})
            require(partners == expected, f"rank {rank}: {what} sent to ranks {partners}; with N a power of two, "
                                          f"round k pairs rank r with r XOR 2^k: {expected}")
        sent = sum(call.nbytes for call in sends)
        require(getattr(traffic, "bytes_sent", None) == sent,
                f"rank {rank}: {what} returned bytes_sent={getattr(traffic, 'bytes_sent', None)}, but its messages "
                f"moved {sent} bytes (the data were right)")

    for count, dtype in cases(size):
        agreed(comm, one_case, count, dtype)


RING_SIZES = (1, 2, 3, 4, 8)
def _then(*bodies):
    """One check running several bodies in turn (one entry: a hang costs one limit, not one per body)."""

    def check(comm):
        for body in bodies:
            body(comm)

    return check


RING = [
    Check("ring_reduce_scatter, 4 buffers in a row", RING_SIZES,
          _phase_check("ring_reduce_scatter", 1, _data, _reduce_scatter_expected, 1), limit=LIMIT),
    Check("ring_all_gather, 4 buffers in a row", RING_SIZES,
          _phase_check("ring_all_gather", 0, _gather_prepare, _gather_expected, 1), limit=LIMIT),
    Check("ring_allreduce, 4 buffers in a row, then op='max'", (2, 3, 8),
          _then(_phase_check("ring_allreduce", 1, _data, _allreduce_expected, 2), check_max("ring_allreduce")),
          limit=LIMIT),
]
RECURSIVE_DOUBLING = [
    Check("recursive_doubling_allreduce, 4 buffers in a row, then op='max'", (1, 2, 3, 4, 6, 8),
          _then(check_recursive_doubling, check_max("recursive_doubling_allreduce")), limit=LIMIT),
]
