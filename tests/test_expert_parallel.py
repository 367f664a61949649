"""All-to-all and expert parallelism equal their single-process references.

One mpiexec launch per world size runs tests/mpi_bodies/expert_parallel_body.py:
  - alltoall / alltoallv, MPI's built-in and the hand-built pairwise exchange, against the blocks
    each rank can compute itself, with exact byte counts, at 1, 2, 3, 4 and 8 ranks;
  - the MoE layer with its experts sharded over ep = 1, 2, 4, 8 ranks against the single-process
    layer (float64, rtol 1e-10): outputs, aux loss, input/router/expert gradients, without drops
    (capacity T) and with drops (the same choices dropped as one process counting capacity over
    the same groups: each rank's tokens); the all-to-all bytes against 2·CF·k·T·C·(N−1)/N;
  - a small GPT with MoE blocks on dp x ep layouts (1 x N, and 2 x 2, 2 x 4) against the
    single-process model: loss and every gradient after average_gradients.
"""
import pytest

from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected

BODY = "tests.mpi_bodies.expert_parallel_body:run_all_checks"
ALL = ["alltoall", "layer", "model", "bad layouts"]


@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_expert_parallel_matches_single_process(nranks):
    layouts = [1, 2] if nranks == 4 else [1]
    assert_as_expected(results_from_ranks(nranks, BODY, timeout=240, layouts=layouts), checks=ALL)


def test_alltoall_on_three_ranks():
    """3 does not divide the 8 experts: only the all-to-alls (uneven block counts) run."""
    assert_as_expected(results_from_ranks(3, BODY, timeout=120), checks=["alltoall", "bad layouts"])


def test_expert_parallel_on_eight_ranks_quick():
    """ep = 8 with MPI's all-to-all and a dp 2 x ep 4 model: the quick 8-rank case."""
    results = results_from_ranks(8, BODY, timeout=300, layouts=[2], algorithms=["mpi"])
    assert_as_expected(results, checks=ALL)


@pytest.mark.slow
def test_expert_parallel_on_eight_ranks_full():
    results = results_from_ranks(8, BODY, timeout=600, layouts=[1, 2])
    assert_as_expected(results, checks=ALL)


# ---- the pairwise exchange on threads (a wrong partner fails in seconds, naming the ranks) ----------

@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_pairwise_alltoall_on_threads(size):
    import numpy as np

    from minipar.comm import collectives
    from tests.test_collectives import run_on_threads

    def rows(source, dest):  # uneven: block sizes differ by pair and direction, some are empty
        return (2 * source + 3 * dest) % 4

    def value(source, dest):
        return 100.0 * source + dest

    def exchange(comm, buffer):
        rank = comm.Get_rank()
        send_bounds = collectives.bounds_from_counts([rows(rank, dest) for dest in range(size)], 2)
        receive_bounds = collectives.bounds_from_counts([rows(source, rank) for source in range(size)], 2)
        total_in = receive_bounds[-1][1]
        collectives.pairwise_alltoall(comm, buffer[0], buffer[1, :total_in], send_bounds, receive_bounds)

    width = 2 * 4 * size  # room for the largest send and receive
    inputs = []
    for rank in range(size):
        buffer = np.full((2, width), np.nan)
        outgoing = np.concatenate([np.full(2 * rows(rank, dest), value(rank, dest)) for dest in range(size)])
        buffer[0, :outgoing.size] = outgoing
        inputs.append(buffer)
    for rank, buffer in enumerate(run_on_threads(size, exchange, inputs)):
        expected = np.concatenate([np.full(2 * rows(source, rank), value(source, rank)) for source in range(size)])
        np.testing.assert_array_equal(buffer[1, :expected.size], expected, err_msg=f"rank {rank}")
