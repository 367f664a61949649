"""Data parallelism on real MPI ranks reproduces single-process training exactly (in float64).

All checks for one world size run inside one mpiexec launch
(tests/mpi_bodies/data_parallel_body.py); what they cover is listed there.
"""
import time

import pytest

from minipar.testing import run_on_ranks
from tests.mpi_bodies.data_parallel_body import CASES
from tests.mpi_bodies.reporting import assert_checks, results

BODY = "tests.mpi_bodies.data_parallel_body"


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_data_parallel_on_ranks(nranks):
    output = run_on_ranks(nranks, f"{BODY}:run_all_checks", timeout=240)
    assert_checks(output, [f"data parallel on {nranks} ranks"])
    checked = {what.split(":")[0] for what, *_ in results(output)[0]["checks"]}
    assert checked == {name for name, *_ in CASES}, checked


@pytest.mark.parametrize("nranks", [2, 4])
def test_unused_parameter_is_averaged_as_zero(nranks):
    output = run_on_ranks(nranks, f"{BODY}:unused_gradients_are_zero", timeout=120)
    assert_checks(output, ["unused gradients"])


def test_parameter_reached_by_two_backward_calls_per_micro_batch():
    output = run_on_ranks(2, f"{BODY}:shared_parameter_reached_twice", timeout=120)
    assert_checks(output, ["shared parameter"])


def test_uncaught_config_error_ends_the_job_promptly():
    started = time.perf_counter()
    with pytest.raises(AssertionError) as failure:
        run_on_ranks(4, f"{BODY}:raise_config_error_uncaught", timeout=120)
    message = str(failure.value)
    assert "failed" in message and "hung" not in message, message
    assert "ConfigError: bucket_bytes must be a positive number of bytes, got 0" in message, message
    assert time.perf_counter() - started < 60
