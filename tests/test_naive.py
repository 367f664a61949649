"""The naive versions read first: data parallelism with one allreduce per parameter
(minipar/parallel/naive_data_parallel.py) and a blocking GPipe step
(minipar/parallel/pipeline/naive_gpipe.py), each equal to one process at 1, 2, 4 and 8 ranks."""
import pytest

from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected

BODY = "tests.mpi_bodies.naive_body"


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_naive_data_parallel_equals_one_process(nranks):
    results = results_from_ranks(nranks, f"{BODY}:naive_data_parallel_matches_one_process", timeout=240)
    assert_as_expected(results, checks=["naive data parallel"])


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_naive_gpipe_equals_one_process(nranks):
    results = results_from_ranks(nranks, f"{BODY}:naive_gpipe_matches_one_process", timeout=240)
    assert_as_expected(results, checks=["naive gpipe"])
