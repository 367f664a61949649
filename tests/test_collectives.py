"""Hand-built collectives agree with MPI's built-ins and count their bytes exactly.

On ranks: everything is checked inside one mpiexec launch per world size (see
tests/mpi_bodies/collectives_body.py), which returns every comparison it made; 3 and 6 ranks
exercise recursive doubling's folding of ranks beyond a power of two.

In threads: the same hand-built algorithms run on N threads that pass messages through queues
(``ThreadComm``), so a wrong partner (a message sent to, or awaited from, the wrong rank) fails
in seconds, naming the ranks and the tag, instead of hanging an MPI job until its timeout.
"""
import functools
import queue
import threading

import numpy as np
import pytest

from minipar.comm import collectives, tree_collectives
from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected

CHECKS = ["check_allreduce", "check_allreduce_rounding", "check_allgather_and_reduce_scatter",
          "check_broadcast_and_reduce", "check_traffic", "check_point_to_point", "check_bad_input", "check_split"]


@pytest.mark.parametrize("nranks", [1, 2, 3, 4, 6, 8])
def test_collectives_on_ranks(nranks):
    results = results_from_ranks(nranks, "tests.mpi_bodies.collectives_body:run_all_checks", timeout=120)
    assert_as_expected(results, checks=CHECKS)


# ---- the algorithms on threads -----------------------------------------------------------------

class ThreadComm:
    """The part of an mpi4py communicator the hand-built collectives use, for one thread-rank.

    Sends are buffered (never block); a receive waits at most ``patience`` seconds for its
    message, then raises naming who waited for whom.
    """

    def __init__(self, rank, size, mailboxes, patience):
        self.rank, self.size, self.mailboxes, self.patience = rank, size, mailboxes, patience

    def _mailbox(self, source, dest, tag):
        with self.mailboxes.lock:
            return self.mailboxes.setdefault((source, dest, tag), queue.Queue())

    def Get_rank(self):  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self):  # noqa: N802
        return self.size

    def Send(self, buffer, dest, tag):  # noqa: N802
        if not 0 <= dest < self.size:
            raise ValueError(f"rank {self.rank} sends to rank {dest}, which does not exist")
        self._mailbox(self.rank, dest, tag).put(np.array(buffer, copy=True))

    def Recv(self, buffer, source, tag):  # noqa: N802
        try:
            message = self._mailbox(source, self.rank, tag).get(timeout=self.patience)
        except queue.Empty:
            raise TimeoutError(f"rank {self.rank} waited {self.patience} s for a message from rank {source} "
                               f"with tag {tag}; none came") from None
        buffer[...] = message.reshape(buffer.shape)

    def Sendrecv(self, send, dest, sendtag, receive, source, recvtag):  # noqa: N802
        self.Send(send, dest, sendtag)
        self.Recv(receive, source, recvtag)


class Mailboxes(dict):
    """(source, dest, tag) -> a queue of messages, created on first use under a lock."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def run_on_threads(size, algorithm, inputs, patience=3.0):
    """Run ``algorithm(comm, buffer)`` on ``size`` thread-ranks; returns the buffers afterwards.

    Raises the first rank's error, and fails if a message was sent that nobody received.
    """
    ranks = range(size)
    mailboxes = Mailboxes()
    buffers = [np.array(array, copy=True) for array in inputs]
    errors = {}

    def rank_main(rank):
        try:
            algorithm(ThreadComm(rank, size, mailboxes, patience), buffers[rank])
        except Exception as error:  # noqa: BLE001 - reported below, by rank
            errors[rank] = error

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise AssertionError("; ".join(f"rank {rank}: {error}" for rank, error in sorted(errors.items())))
    unreceived = [key for key, box in mailboxes.items() if not box.empty()]
    assert not unreceived, f"messages (source, dest, tag) sent but never received: {unreceived}"
    return buffers


ALGORITHMS = {
    "ring allreduce": lambda comm, buffer: collectives.ring_allreduce(comm, buffer),
    "recursive doubling allreduce": lambda comm, buffer: collectives.recursive_doubling_allreduce(comm, buffer),
    "tree allreduce": lambda comm, buffer: tree_collectives.tree_allreduce(comm, buffer),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("size", [1, 2, 3, 5, 6, 8])
def test_allreduce_algorithms_on_threads(name, size):
    inputs = [np.arange(11.0) * (rank + 1) for rank in range(size)]
    expected = np.arange(11.0) * size * (size + 1) / 2
    for rank, buffer in enumerate(run_on_threads(size, ALGORITHMS[name], inputs)):
        np.testing.assert_array_equal(buffer, expected, err_msg=f"{name} on {size} ranks: rank {rank}")


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_tree_broadcast_and_reduce_on_threads_from_every_root(size):
    for root in range(size):
        inputs = [np.full(4, 100.0 + rank) for rank in range(size)]
        broadcast = functools.partial(tree_collectives.tree_broadcast, root=root)
        for rank, buffer in enumerate(run_on_threads(size, broadcast, inputs)):
            np.testing.assert_array_equal(buffer, inputs[root], err_msg=f"broadcast root {root}: rank {rank}")
        reduced = run_on_threads(size, functools.partial(tree_collectives.tree_reduce, root=root), inputs)[root]
        np.testing.assert_array_equal(reduced, sum(inputs), err_msg=f"reduce to root {root}")


def test_a_wrong_tree_partner_fails_in_seconds(monkeypatch):
    """A planted bug: every parent one rank off. The threads name who waited for whom, well before any timeout."""
    real = tree_collectives.binomial_parent_distance
    monkeypatch.setattr(tree_collectives, "binomial_parent_distance", lambda relative, size: real(relative, size) + 1)
    inputs = [np.full(4, float(rank)) for rank in range(4)]
    with pytest.raises(AssertionError, match=r"rank \d: .*(waited 0.5 s for a message from rank \d+|does not exist)"):
        run_on_threads(4, lambda c, b: tree_collectives.tree_broadcast(c, b, 0), inputs, patience=0.5)


def test_modelled_traffic_is_worked_out_once_and_handed_out_fresh():
    """The model of a built-in collective is cached per distinct call; each caller still gets its own
    Traffic. Ring allreduce of 10 elements on 4 ranks, rank 1 (blocks of 3, 3, 2, 2): the
    reduce-scatter sends all blocks but its own (10 − 3) and receives all but rank 0's (10 − 3),
    the all-gather sends all but rank 2's (10 − 2) and receives all but its own (10 − 3)."""
    from minipar.comm.traffic import Traffic, modelled_traffic

    first = modelled_traffic("allreduce", 1, 4, 10, 8)
    first.bytes_sent = -1  # a caller that changes its copy changes nobody else's
    assert modelled_traffic("allreduce", 1, 4, 10, 8) == Traffic((7 + 8) * 8, (7 + 7) * 8)
    assert modelled_traffic("reduce_scatter", 1, 4, 10, 8) == Traffic(7 * 8, 7 * 8)
    assert modelled_traffic("allreduce", 0, 1, 10, 8) == Traffic()
