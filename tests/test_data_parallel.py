"""Data parallelism on real MPI ranks reproduces single-process training exactly (in float64).

All checks for one world size run inside one mpiexec launch
(tests/mpi_bodies/data_parallel_body.py); what they cover is listed there.
"""
import time

import pytest

from minipar.testing import results_from_ranks, run_on_ranks
from tests.mpi_bodies.comparisons import assert_as_expected
from tests.mpi_bodies.data_parallel_body import CASES

BODY = "tests.mpi_bodies.data_parallel_body"


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_data_parallel_on_ranks(nranks):
    results = results_from_ranks(nranks, f"{BODY}:run_all_checks", timeout=240)
    assert_as_expected(results, checks=["buckets", "broadcast", "equivalence", "divergence", "bad inputs"])
    compared = {what.split(":")[0] for what, *_ in results[0]["comparisons"]}
    missing = {name for name, *_ in CASES} - compared
    assert not missing, f"cases never compared with one process: {sorted(missing)}"


@pytest.mark.parametrize("nranks", [2, 4])
def test_unused_parameter_is_averaged_as_zero(nranks):
    results = results_from_ranks(nranks, f"{BODY}:unused_gradients_are_zero", timeout=120)
    assert_as_expected(results, checks=["unused gradients"])


def test_parameter_reached_by_two_backward_calls_per_micro_batch():
    results = results_from_ranks(2, f"{BODY}:shared_parameter_reached_twice", timeout=120)
    assert_as_expected(results, checks=["shared parameter"])


def test_uncaught_config_error_ends_the_job_promptly():
    started = time.perf_counter()
    with pytest.raises(AssertionError) as failure:
        run_on_ranks(4, f"{BODY}:raise_config_error_uncaught", timeout=120)
    message = str(failure.value)
    assert "failed" in message and "hung" not in message, message
    assert "ConfigError: bucket_bytes must be a positive number of bytes, got 0" in message, message
    assert time.perf_counter() - started < 60
