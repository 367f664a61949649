"""Checks for minipar.comm, run on every rank by tests/test_collectives.py (one launch per world size).

Each check records its comparisons (tests/mpi_bodies/comparisons.py) and ``run_all_checks``
returns them: pytest fails listing every one that differs, with its rank, expected and got.

Contributions are small integers stored as floats, so every sum is exact in
float32 and float64 whatever the order of additions: hand-built and built-in
results must agree exactly, not within a tolerance. One check uses real-valued
data and bounds the rounding error instead.
"""

from minipar.backend import xp
from minipar.comm import Communicator, collectives
from minipar.errors import ConfigError, ShapeError
from tests.mpi_bodies.comparisons import Comparisons

SIZES = (0, 1, 7, 64, 1003)
DTYPES = (xp.float32, xp.float64)
DIVISIBLE_SIZE = 840  # divisible by every world size from 1 to 8


def contribution(rank, count, dtype, salt=0):
    """Rank ``rank``'s data: integers in [-8, 8], reproducible on every rank."""
    generator = xp.random.default_rng([salt, rank, count])
    return generator.integers(-8, 9, size=count).astype(dtype)


def all_contributions(size, count, dtype, salt=0):
    return xp.stack([contribution(rank, count, dtype, salt) for rank in range(size)]) if size else None


def compare_across_ranks(communicator, compare, array, what):
    gathered = xp.empty((communicator.size, array.size), dtype=array.dtype)
    communicator.mpi.Allgather(xp.ascontiguousarray(array.reshape(-1)), gathered)
    for rank in range(communicator.size):
        compare.arrays_equal(f"{what}: rank {rank} against rank 0 (bitwise)", gathered[rank], gathered[0])


def check_allreduce(communicator, compare):
    rank, size = communicator.rank, communicator.size
    for dtype in DTYPES:
        for count in SIZES:
            everyone = all_contributions(size, count, dtype)
            ops = (("sum", everyone.sum(axis=0)), ("max", everyone.max(axis=0)))
            # max and out= take the same code paths at every size; two sizes each keep the launch short.
            for op, expected in ops if count in (7, 1003) else ops[:1]:
                for algorithm in ("mpi", "ring", "recursive_doubling", "tree"):
                    what = f"allreduce {op} {algorithm} {xp.dtype(dtype).name} n={count} rank {rank}"
                    in_place = contribution(rank, count, dtype)
                    returned = communicator.allreduce(in_place, op=op, algorithm=algorithm)
                    compare.true(f"{what}: the in-place call returns its array", returned is in_place)
                    compare.arrays_equal(what, in_place, expected)
                    if count in (0, 1003):
                        source = contribution(rank, count, dtype)
                        out = xp.full(count, xp.nan, dtype=dtype)
                        returned = communicator.allreduce(source, out=out, op=op, algorithm=algorithm)
                        compare.true(f"{what}: returns out=", returned is out)
                        compare.arrays_equal(what + " (out=)", out, expected)
                        compare.arrays_equal(what + ": input unchanged", source, contribution(rank, count, dtype))
    # A multi-dimensional array and a 0-d array reduce like their flat contents.
    matrix = contribution(rank, 12, xp.float64).reshape(3, 4)
    for algorithm in ("ring", "recursive_doubling", "tree"):
        result = communicator.allreduce(matrix.copy(), algorithm=algorithm)
        expected = all_contributions(size, 12, xp.float64).sum(axis=0).reshape(3, 4)
        compare.arrays_equal(f"3x4 {algorithm}", result, expected)
        scalar = communicator.allreduce(xp.array(float(rank + 1)), algorithm=algorithm)
        compare.value(f"0-d allreduce {algorithm}", float(scalar), size * (size + 1) / 2)


def check_allreduce_rounding(communicator, compare):
    """Real-valued data: every algorithm within the summation error bound, bitwise equal across ranks."""
    rank, size = communicator.rank, communicator.size
    for dtype in DTYPES:
        generator = xp.random.default_rng([7, rank])
        data = generator.standard_normal(1003).astype(dtype)
        builtin = communicator.allreduce(data.copy(), algorithm="mpi")
        magnitude = communicator.allreduce(xp.abs(data).astype(xp.float64), algorithm="mpi")
        # Each of two (N−1)-term float sums is within (N−1)·eps·Σ|x| of the exact sum.
        bound = 2 * max(size - 1, 0) * xp.finfo(dtype).eps * magnitude
        for algorithm in ("ring", "recursive_doubling", "tree"):
            ours = communicator.allreduce(data.copy(), algorithm=algorithm)
            error = xp.abs(ours.astype(xp.float64) - builtin.astype(xp.float64))
            compare.value(f"{algorithm} {xp.dtype(dtype).name} rank {rank}: elements above the error bound",
                          int((error > bound).sum()), 0)
            compare_across_ranks(communicator, compare, ours, f"{algorithm} allreduce {xp.dtype(dtype).name}")


def check_allgather_and_reduce_scatter(communicator, compare):
    rank, size = communicator.rank, communicator.size
    for dtype in DTYPES:
        for shape in [(count,) for count in SIZES] + [(3, 5)]:
            count = int(xp.prod(shape))
            for algorithm in ("mpi", "ring"):
                what = f"{algorithm} {xp.dtype(dtype).name} shape={shape} rank {rank}"
                piece = contribution(rank, count, dtype).reshape(shape)
                gathered = xp.full((size * shape[0], *shape[1:]), xp.nan, dtype=dtype)
                communicator.allgather(piece, gathered, algorithm=algorithm)
                expected = all_contributions(size, count, dtype).reshape(size * shape[0], *shape[1:])
                compare.arrays_equal("allgather " + what, gathered, expected)

                for op in ("sum", "max"):
                    full = contribution(rank, size * count, dtype, salt=1).reshape(size * shape[0], *shape[1:])
                    untouched = full.copy()
                    mine = xp.full(shape, xp.nan, dtype=dtype)
                    communicator.reduce_scatter(full, mine, op=op, algorithm=algorithm)
                    everyone = all_contributions(size, size * count, dtype, salt=1)
                    reduced = everyone.sum(axis=0) if op == "sum" else everyone.max(axis=0)
                    expected = reduced.reshape(size * shape[0], *shape[1:])[rank * shape[0]:(rank + 1) * shape[0]]
                    compare.arrays_equal(f"reduce_scatter {op} " + what, mine, expected)
                    compare.arrays_equal(f"reduce_scatter {op} input unchanged, " + what, full, untouched)


def check_broadcast_and_reduce(communicator, compare):
    rank, size = communicator.rank, communicator.size
    for dtype in DTYPES:
        for count in SIZES:
            for root in sorted({0, size - 1}):
                for algorithm in ("mpi", "tree"):
                    what = f"{algorithm} {xp.dtype(dtype).name} n={count} root {root} rank {rank}"
                    array = contribution(rank, count, dtype)
                    communicator.broadcast(array, root=root, algorithm=algorithm)
                    compare.arrays_equal("broadcast " + what, array, contribution(root, count, dtype))

                    everyone = all_contributions(size, count, dtype)
                    for op, expected in (("sum", everyone.sum(axis=0)), ("max", everyone.max(axis=0))):
                        out = xp.full(count, xp.nan, dtype=dtype) if rank == root else None
                        source = contribution(rank, count, dtype)
                        result = communicator.reduce(source, out, root=root, op=op, algorithm=algorithm)
                        if rank == root:
                            compare.true(f"reduce {op} {what}: returns out", result is out)
                            compare.arrays_equal(f"reduce {op} " + what, out, expected)
                        compare.arrays_equal(f"reduce {op} input unchanged " + what, source,
                                             contribution(rank, count, dtype))


def _gather_record(communicator, name):
    record = communicator.counters[name]
    return communicator.mpi.allgather((record.bytes_sent, record.bytes_received))


def binomial_fan_out(relative, size):
    """Children of ``relative`` (rank counted from the root) in a binomial tree: relative + 2^j
    for each 2^j below its lowest set bit (below 2^⌈lg N⌉ for the root) that is a rank."""
    lowest_bit = relative & -relative if relative else 1 << (size - 1).bit_length()
    return sum(1 for j in range(lowest_bit.bit_length() - 1) if relative + (1 << j) < size)


def check_traffic(communicator, compare):
    """Hand-built collectives count exact bytes; the built-ins record the same textbook volumes."""
    rank, size = communicator.rank, communicator.size
    lg_ceiling = (size - 1).bit_length()  # ⌈lg N⌉
    for dtype in DTYPES:
        itemsize = xp.dtype(dtype).itemsize
        for count in (1003, DIVISIBLE_SIZE):
            nbytes = count * itemsize
            per_algorithm = {}
            for algorithm in ("ring", "mpi"):
                communicator.reset_counters()
                communicator.allreduce(contribution(rank, count, dtype), algorithm=algorithm)
                what = f"{algorithm} allreduce {xp.dtype(dtype).name} n={count}"
                record = communicator.counters["allreduce"]
                compare.value(f"{what}: (calls, elements)", (record.calls, record.elements), (1, count))
                per_algorithm[algorithm] = _gather_record(communicator, "allreduce")
                totals = [sum(pair[i] for pair in per_algorithm[algorithm]) for i in (0, 1)]
                compare.value(f"{what}: total bytes (sent, received)", totals, [2 * (size - 1) * nbytes] * 2)
                if count % size == 0:
                    compare.value(f"{what}: this rank's bytes (sent, received)",
                                  (record.bytes_sent, record.bytes_received), (2 * (size - 1) * nbytes // size,) * 2)
            compare.value(f"allreduce n={count}: the built-in's modelled bytes per rank against the ring's",
                          per_algorithm["mpi"], per_algorithm["ring"])

            piece_count = count // size if count % size == 0 else count
            full_bytes = size * piece_count * itemsize
            for algorithm in ("ring", "mpi"):
                communicator.reset_counters()
                gathered = xp.empty(size * piece_count, dtype=dtype)
                communicator.allgather(contribution(rank, piece_count, dtype), gathered, algorithm=algorithm)
                communicator.reduce_scatter(gathered, xp.empty(piece_count, dtype=dtype), algorithm=algorithm)
                for name in ("allgather", "reduce_scatter"):
                    record = communicator.counters[name]
                    what = f"{algorithm} {name} {xp.dtype(dtype).name} n={size * piece_count}"
                    compare.value(f"{what}: (calls, elements)", (record.calls, record.elements),
                                  (1, size * piece_count))
                    compare.value(f"{what}: bytes (sent, received)", (record.bytes_sent, record.bytes_received),
                                  ((size - 1) * full_bytes // size,) * 2)

            for algorithm in ("tree", "mpi"):
                root = size - 1
                communicator.reset_counters()
                communicator.broadcast(contribution(rank, count, dtype), root=root, algorithm=algorithm)
                out = xp.empty(count, dtype=dtype) if rank == root else None
                communicator.reduce(contribution(rank, count, dtype), out, root=root, algorithm=algorithm)
                from_parent = 0 if rank == root else nbytes
                fan_out = binomial_fan_out((rank - root) % size, size) * nbytes
                if rank == root:
                    compare.value("the root's fan-out is ⌈lg N⌉ children", fan_out, lg_ceiling * nbytes)
                broadcast, reduce = communicator.counters["broadcast"], communicator.counters["reduce"]
                what = f"{algorithm} {xp.dtype(dtype).name} n={count} root {root}"
                compare.value(f"broadcast {what}: bytes (sent, received)",
                              (broadcast.bytes_sent, broadcast.bytes_received), (fan_out, from_parent))
                compare.value(f"reduce {what}: bytes (sent, received)",
                              (reduce.bytes_sent, reduce.bytes_received), (from_parent, fan_out))
                for name in ("broadcast", "reduce"):
                    totals = [sum(pair[i] for pair in _gather_record(communicator, name)) for i in (0, 1)]
                    compare.value(f"{name} {what}: total bytes (sent, received)", totals, [(size - 1) * nbytes] * 2)

            communicator.reset_counters()
            communicator.allreduce(contribution(rank, count, dtype), algorithm="recursive_doubling")
            power = 1 << (size.bit_length() - 1)
            extra = size - power
            rounds = power.bit_length() - 1
            if rank < 2 * extra:
                expected = (1, 1) if rank % 2 == 0 else (rounds + 1, rounds + 1)
            else:
                expected = (rounds, rounds)
            record = communicator.counters["allreduce"]
            compare.value(f"recursive doubling {xp.dtype(dtype).name} n={count}: bytes (sent, received)",
                          (record.bytes_sent, record.bytes_received), (expected[0] * nbytes, expected[1] * nbytes))


def check_point_to_point(communicator, compare):
    rank, size = communicator.rank, communicator.size
    right, left = (rank + 1) % size, (rank - 1) % size
    events = []
    communicator.add_listener(lambda name, start, end, nbytes: events.append((name, nbytes)))
    communicator.reset_counters()
    for dtype in DTYPES:
        mine = contribution(rank, 64, dtype)
        incoming = xp.empty(64, dtype=dtype)
        communicator.sendrecv(mine, right, incoming, left, tag=3)
        compare.arrays_equal(f"sendrecv {xp.dtype(dtype).name}", incoming, contribution(left, 64, dtype))

        receive = communicator.irecv(xp.empty(64, dtype=dtype), left, tag=4)
        send = communicator.isend(mine, right, tag=4)
        send.wait()
        compare.arrays_equal(f"isend/irecv {xp.dtype(dtype).name}", receive.wait(), contribution(left, 64, dtype))

        if size > 1:  # blocking send/recv: even ranks send first, so the pairs cannot deadlock
            partner = rank ^ 1
            if partner < size:
                if rank % 2 == 0:
                    communicator.send(mine, partner, tag=5)
                    communicator.recv(incoming, partner, tag=5)
                else:
                    communicator.recv(incoming, partner, tag=5)
                    communicator.send(mine, partner, tag=5)
                compare.arrays_equal(f"send/recv {xp.dtype(dtype).name}", incoming, contribution(partner, 64, dtype))

        summed = contribution(rank, 1003, dtype)
        request = communicator.iallreduce(summed)
        compare.true(f"iallreduce {xp.dtype(dtype).name}: wait returns the array", request.wait() is summed)
        expected = all_contributions(size, 1003, dtype).sum(axis=0)
        compare.arrays_equal(f"iallreduce {xp.dtype(dtype).name}", summed, expected)

    record = communicator.counters["sendrecv"]
    compare.value("sendrecv (calls, elements, bytes sent)", (record.calls, record.elements, record.bytes_sent),
                  (2, 128, 64 * 4 + 64 * 8))
    compare.value("bytes (isend sent, irecv received)", (communicator.counters["isend"].bytes_sent,
                                                         communicator.counters["irecv"].bytes_received), (64 * 12,) * 2)
    compare.value("iallreduce calls", communicator.counters["iallreduce"].calls, 2)
    compare.value("calls of a collective never called", communicator.counters["never_called"].calls, 0)
    snapshot = communicator.counters_snapshot()
    compare.value("counter fields", sorted(snapshot["sendrecv"]),
                  sorted(["calls", "elements", "bytes_sent", "bytes_received", "seconds"]))
    compare.value("listener saw (sendrecv, 256 B) and (iallreduce, 8024 B)",
                  [("sendrecv", 64 * 4) in events, ("iallreduce", 1003 * 8) in events], [True, True])


def check_bad_input(communicator, compare):
    """Bad arguments raise minipar errors on every rank before any message moves."""
    size = communicator.size
    array = xp.zeros((4, 6))
    read_only = xp.zeros(3)
    read_only.flags.writeable = False
    cases = [
        (ShapeError, "not C-contiguous", lambda: communicator.allreduce(array[:, ::2])),
        (ShapeError, "(5,)", lambda: communicator.allreduce(array, out=xp.zeros(5))),
        (ShapeError, "float32", lambda: communicator.allreduce(array, out=xp.zeros((4, 6), xp.float32))),
        (ShapeError, "float32", lambda: communicator.allgather(array, xp.zeros((4 * size, 6), xp.float32))),
        (ShapeError, "root rank must pass an out", lambda: communicator.reduce(array, None, root=communicator.rank)),
        (ShapeError, "read-only", lambda: communicator.broadcast(read_only)),
        (ConfigError, "algorithm", lambda: communicator.allreduce(array, algorithm="butterfly")),
        (ConfigError, "op", lambda: communicator.allreduce(array, op="product")),
        (ShapeError, "stacked", lambda: communicator.allgather(array, xp.zeros((4 * size + 1, 6)))),
        (ShapeError, "stacked", lambda: communicator.reduce_scatter(xp.zeros(size + 1), xp.zeros(1))),
        (ConfigError, "root", lambda: communicator.broadcast(array, root=size)),
        (ShapeError, "must be an array", lambda: communicator.send([1.0, 2.0], 0)),
        (ShapeError, "C-contiguous", lambda: collectives.ring_allreduce(communicator.mpi, array[:, ::2])),
    ]
    for error_type, words, call in cases:
        try:
            call()
        except (ConfigError, ShapeError) as error:
            got = [type(error).__name__, words in str(error), str(error) if words not in str(error) else ""]
        else:
            got = ["nothing raised", False, ""]
        compare.value(f"bad input: {error_type.__name__} mentioning {words!r}", got, [error_type.__name__, True, ""])


def check_split(communicator, compare):
    rank = communicator.rank
    half = communicator.split(color=rank % 2, key=rank)
    members = [r for r in range(communicator.size) if r % 2 == rank % 2]
    compare.value("split: (size, rank)", (half.size, half.rank), (len(members), members.index(rank)))
    total = half.allreduce(xp.array([float(rank)]), algorithm="ring")
    compare.value("split: ring allreduce of the ranks in the half", float(total[0]), float(sum(members)))
    compare.value("allreduce calls counted (parent, half): separate counters",
                  (communicator.counters["allreduce"].calls, half.counters["allreduce"].calls), (0, 1))


CHECKS = [check_allreduce, check_allreduce_rounding, check_allgather_and_reduce_scatter,
          check_broadcast_and_reduce, check_traffic, check_point_to_point, check_bad_input, check_split]


def run_all_checks(comm):
    """Every check on this rank; returns the comparisons for pytest to judge."""
    communicator, compare = Communicator(comm), Comparisons()
    for check in CHECKS:
        communicator.reset_counters()
        check(communicator, compare)
        compare.checks.append(check.__name__)
    return compare.report()
