"""Hand-built collectives agree with MPI's built-ins and count their bytes exactly.

Everything is checked inside one mpiexec launch per world size (see
tests/mpi_bodies/collectives_body.py); 3 and 6 ranks exercise recursive
doubling's folding of ranks beyond a power of two.
"""
import pytest

from minipar.testing import run_on_ranks


@pytest.mark.parametrize("nranks", [1, 2, 3, 4, 6, 8])
def test_collectives_on_ranks(nranks):
    output = run_on_ranks(nranks, "tests.mpi_bodies.collectives_body:run_all_checks", timeout=120)
    assert f"all 8 collective checks passed on {nranks} ranks" in output
