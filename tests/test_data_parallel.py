"""Data parallelism on real MPI ranks reproduces single-process training exactly (in float64).

All checks for one world size run inside one mpiexec launch
(tests/mpi_bodies/data_parallel_body.py); what they cover is listed there.
"""
import time

import pytest

from minipar.testing import run_on_ranks

BODY = "tests.mpi_bodies.data_parallel_body"


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_data_parallel_on_ranks(nranks):
    output = run_on_ranks(nranks, f"{BODY}:run_all_checks", timeout=240)
    assert f"data parallel matches one process in 8 cases on {nranks} ranks" in output
    assert f"all data parallel checks passed on {nranks} ranks" in output


@pytest.mark.parametrize("nranks", [2, 4])
def test_unused_parameter_is_averaged_as_zero(nranks):
    output = run_on_ranks(nranks, f"{BODY}:unused_gradients_are_zero", timeout=120)
    assert "unused gradients averaged as zero" in output


def test_parameter_reached_by_two_backward_calls_per_micro_batch():
    output = run_on_ranks(2, f"{BODY}:shared_parameter_reached_twice", timeout=120)
    assert "shared parameter sent after its last use" in output


def test_uncaught_config_error_ends_the_job_promptly():
    started = time.perf_counter()
    with pytest.raises(AssertionError) as failure:
        run_on_ranks(4, f"{BODY}:raise_config_error_uncaught", timeout=120)
    message = str(failure.value)
    assert "failed" in message and "hung" not in message, message
    assert "ConfigError: bucket_bytes must be a positive number of bytes, got 0" in message, message
    assert time.perf_counter() - started < 60
