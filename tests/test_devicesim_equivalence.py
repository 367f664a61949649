"""The float64 equivalence suite (tests/test_equivalence.py) under devicesim, at 1, 2 and 4 ranks.

Every layout and option of every mode (dp with buckets, overlap and the hand-built
allreduces, tp with sequence parallelism, pp with GPipe, 1F1B and interleaved schedules and
recomputation, 3D, ZeRO 1-3) trains on device arrays with staged communication and must match
the single-process run as tightly as under NumPy; so must the gradients and the global norm
before the update. Code that converts a device array to NumPy implicitly (numpy.asarray,
numpy.testing, an MPI buffer) fails here first.

    MINIPAR_BACKEND=devicesim python -m pytest -q -m devicesim
"""
import pytest

from minipar.backend import BACKEND_NAME
from minipar.testing import results_from_ranks
from tests import test_equivalence as numpy_suite

pytestmark = [
    pytest.mark.devicesim,
    pytest.mark.skipif(BACKEND_NAME != "devicesim", reason="run with MINIPAR_BACKEND=devicesim (MPI jobs)"),
]


def train_and_compare(world_size, cases):
    results = results_from_ranks(world_size, "tests.mpi_bodies.equivalence_body:check_layouts", timeout=900,
                                 cases=cases)
    numpy_suite.assert_same_training(cases, results[0])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_layout_equals_single_process_on_devicesim(world_size):
    layouts = [numpy_suite.with_microbatches(layout) for layout in numpy_suite.factorisations(world_size)]
    train_and_compare(world_size, layouts + numpy_suite.OPTIONS[world_size])


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_layout_with_zero_equals_single_process_on_devicesim(world_size):
    train_and_compare(world_size, numpy_suite.zero_cases(world_size))


@pytest.mark.parametrize("world_size", sorted(numpy_suite.GRADIENT_CASES))
def test_gradients_and_norm_equal_single_process_on_devicesim(world_size):
    numpy_suite.test_gradients_and_norm_equal_single_process_before_the_update(world_size)
