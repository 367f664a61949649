"""The float64 equivalence suite (tests/test_equivalence.py) under devicesim, at 1, 2 and 4 ranks.

Every layout and option of every mode (dp with buckets, overlap and the hand-built
allreduces, tp with sequence parallelism, pp with GPipe, 1F1B and interleaved schedules and
recomputation, 3D, ZeRO 1-3) trains on device arrays with staged communication and must match
the single-process run as tightly as under NumPy. Code that converts a device array to
NumPy implicitly (numpy.asarray, numpy.testing, an MPI buffer) fails here first.

    MINIPAR_BACKEND=devicesim python -m pytest -q -m devicesim
"""
import pytest

from minipar.backend import BACKEND_NAME
from minipar.testing import run_on_ranks
from tests.test_equivalence import OPTIONS, factorisations, with_microbatches, zero_cases

pytestmark = [
    pytest.mark.devicesim,
    pytest.mark.skipif(BACKEND_NAME != "devicesim", reason="run with MINIPAR_BACKEND=devicesim (MPI jobs)"),
]


def check(world_size, cases):
    output = run_on_ranks(world_size, "tests.mpi_bodies.equivalence_body:check_layouts", timeout=900, cases=cases)
    for case in cases:
        assert f"layout ok: {case}" in output, f"no confirmation for {case}:\n{output}"


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_layout_equals_single_process_on_devicesim(world_size):
    check(world_size, [with_microbatches(layout) for layout in factorisations(world_size)] + OPTIONS[world_size])


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_layout_with_zero_equals_single_process_on_devicesim(world_size):
    check(world_size, zero_cases(world_size))
