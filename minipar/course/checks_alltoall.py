"""Checks for the hand-built pairwise-exchange all-to-all (``pairwise_alltoall`` in
minipar/comm/collectives.py): values and contract.

Values. The element $k$ of the block rank $i$ sends rank $j$ is $100000·i + 1000·j + (k mod 1000)$, an
integer exact in float32 and float64, so a wrong value names who sent it to whom. Each check
calls the function on several exchanges in a row, as expert parallelism does step after step:
equal blocks, uneven blocks with some empty, every block but the own one empty, and blocks far
above MPI's eager limit, in float64 and float32; ``out`` keeps its dtype, ``send`` is untouched.

Contract, read from a ``Spy`` on the communicator (``spy.py``): no MPI collective (no Alltoall);
at most $N − 1$ sends and $N − 1$ receives per call, each with a distinct partner other than the
rank itself (exactly $N − 1$ each way when no block is empty), every non-empty block sent once to its
owner, whole, in the buffer's own dtype; the ``Traffic`` returned is what the spy saw moving. Sends
are synchronous (``Ssend``), so an order that needs MPI to buffer a message (every rank sending
before it receives) deadlocks here on every size; such a check ends at its short limit with the
line each rank waits on. Either direction of the shift, Sendrecv or Isend/Irecv, XOR pairing:
every order that meets the contract passes.
"""
import numpy as np

from minipar.course.checking import Check, CheckFailure, agreed, compare, require
from minipar.course.spy import Spy

LIMIT = 12.0   # seconds: the exchange finishes in well under one on 8 ranks


def value(sender, receiver, k):
    return 100000.0 * sender + 1000.0 * receiver + k % 1000


def cases(size):
    """(name, ``counts[i][j]`` = elements rank i sends rank j, dtype) of the exchanges one check runs in a row."""
    ranks = range(size)
    return [("equal blocks of 3", [[3] * size for _ in ranks], np.float64),
            ("uneven blocks, some empty", [[(i + 2 * j) % 3 for j in ranks] for i in ranks], np.float32),
            ("every block but the own one empty", [[2 if i == j else 0 for j in ranks] for i in ranks], np.float64),
            ("blocks above the eager limit", [[20_000 + i + 3 * j for j in ranks] for i in ranks], np.float64),
            ("uneven blocks, float32", [[(i * j + 1) % 4 * 5 for j in ranks] for i in ranks], np.float32)]


def bounds(counts):
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    return [(int(starts[j]), int(starts[j + 1])) for j in range(len(counts))]


def send_data(rank, counts, dtype):
    return np.concatenate([[value(rank, j, k) for k in range(count)] for j, count in enumerate(counts[rank])]
                          + [np.zeros(0)]).astype(dtype)


def expected_out(rank, counts, dtype):
    return np.concatenate([[value(i, rank, k) for k in range(row[rank])] for i, row in enumerate(counts)]
                          + [np.zeros(0)]).astype(dtype)


def _hint(index, got, expected):
    got = float(got)
    if got == -1:
        return "-1 means nothing arrived in this slot (out starts filled with -1)"
    if got != int(got) or got < 0:
        return ""
    sender, receiver, k = int(got // 100000), int(got // 1000) % 100, int(got) % 1000
    return (f"the value there is element {k} (mod 1000) of the block rank {sender} sends rank {receiver} "
            "(element k of the block rank i sends rank j is 100000·i + 1000·j + k mod 1000)")


def check_contract(spy, what, rank, size, send_counts, receive_counts, dtype, traffic):
    used = sorted({call.method for call in spy.collectives()})
    require(not used, f"rank {rank}: {what} called MPI's {', '.join(used)}: the pairwise exchange moves its data "
                      "with point-to-point messages only (Sendrecv, Send/Recv or Isend/Irecv)")
    sends, receives = spy.sends(), spy.receives()
    for calls, counts, way in ((sends, send_counts, "sent to"), (receives, receive_counts, "received from")):
        peers = [call.peer for call in calls]
        require(rank not in peers, f"rank {rank}: {what} {way} itself; the own block is a local copy, no message")
        require(len(peers) == len(set(peers)) and len(peers) <= size - 1,
                f"rank {rank}: {what} {way} ranks {peers} on N = {size}: the pairwise exchange has N − 1 = "
                f"{size - 1} steps, each with a distinct partner")
        wanted = sorted(j for j in range(size) if j != rank and counts[j] > 0)
        require(set(wanted) <= set(peers), f"rank {rank}: {what} never {way} ranks "
                                           f"{sorted(set(wanted) - set(peers))}, which hold a non-empty block")
        for call in calls:
            require(call.dtype in ("", np.dtype(dtype).name),
                    f"rank {rank}: {what} moved {call.dtype} in a {np.dtype(dtype).name} all-to-all ({call.method}): "
                    "messages carry the buffer's own dtype")
    for call in sends:
        require(call.elements == send_counts[call.peer],
                f"rank {rank}: {what} sent {call.elements} elements to rank {call.peer}; its block holds "
                f"{send_counts[call.peer]}: each block travels once, whole, straight to its owner")
    sent, received = sum(call.nbytes for call in sends), sum(call.nbytes for call in receives)
    reported = (getattr(traffic, "bytes_sent", None), getattr(traffic, "bytes_received", None))
    require(reported == (sent, received),
            f"rank {rank}: {what} returned Traffic(bytes_sent={reported[0]}, bytes_received={reported[1]}), but its "
            f"messages moved {sent} bytes out and {received} in (the data were right)")


def check_pairwise(comm):
    from minipar.comm import collectives

    rank, size = comm.Get_rank(), comm.Get_size()

    def one_case(name, counts, dtype):
        send = send_data(rank, counts, dtype)
        kept = send.copy()
        receive_counts = [row[rank] for row in counts]
        out = np.full(sum(receive_counts), -1, dtype=dtype)
        spy = Spy(comm)
        what = f"pairwise_alltoall ({name}, {np.dtype(dtype).name})"
        try:
            traffic = collectives.pairwise_alltoall(spy, send, out, bounds(counts[rank]), bounds(receive_counts))
        except (CheckFailure, NotImplementedError):
            raise
        except Exception as error:  # noqa: BLE001 - the student's code may raise anything: name the exchange
            from minipar.course.runner import _where

            lines = str(error).strip().splitlines() or [""]
            raise CheckFailure(f"rank {rank}: {what} raised {type(error).__name__}: {lines[-1].strip()}"
                               f"{_where(error)}; send_bounds = {bounds(counts[rank])}, receive_bounds = "
                               f"{bounds(receive_counts)}") from error
        require(out.dtype == dtype and send.dtype == dtype, f"rank {rank}: {what} changed a buffer's dtype")
        try:
            compare(f"rank {rank}: {what}, out element", out, expected_out(rank, counts, dtype),
                    "block i of out is what rank i sent this rank", _hint)
        except CheckFailure:   # a built-in or a wrong dtype is the likelier cause: say that first
            if spy.collectives() or any(call.dtype not in ("", np.dtype(dtype).name) for call in spy.calls):
                check_contract(spy, what, rank, size, counts[rank], receive_counts, dtype, None)
            raise
        compare(f"rank {rank}: {what}, send element", send, kept, "send is read, never written")
        check_contract(spy, what, rank, size, counts[rank], receive_counts, dtype, traffic)
        if min(min(row) for row in counts) > 0:
            require(len(spy.sends()) == size - 1, f"rank {rank}: {what} sent {len(spy.sends())} messages with no "
                                                  f"block empty; the pairwise exchange sends N − 1 = {size - 1}")

    for name, counts, dtype in cases(size):
        agreed(comm, one_case, name, counts, dtype)


PAIRWISE_ALLTOALL = [
    Check("pairwise_alltoall, 5 exchanges in a row (equal, uneven, empty, large; f64/f32)", (1, 2, 3, 4, 5, 8),
          check_pairwise, limit=LIMIT),
]
