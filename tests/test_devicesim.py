"""The CuPy stand-in and the transport choice, in one process (fast: also in the default run).

devicesim must refuse exactly what CuPy refuses (implicit conversion to NumPy, NumPy arrays
in device operations, MPI buffers, numpy.save), compute bitwise what NumPy computes, and
count every host<->device copy. The transport rules (which of staged, cuda-aware, nccl can
run where) and the device-per-rank rule are pure functions, checked here.
"""
import io

import numpy
import pytest
from mpi4py import MPI

from minipar import devicesim
from minipar.comm.transport import Placement, device_for_rank, mpi_reports_cuda_support, transport_problem

pytestmark = pytest.mark.devicesim


@pytest.fixture
def counted():
    devicesim.reset_transfers()
    yield devicesim.transfers
    devicesim.reset_transfers()


def device(values):
    return devicesim.asarray(numpy.asarray(values, dtype=numpy.float64))


REFUSALS = {
    "numpy.asarray": lambda x: numpy.asarray(x),
    "__array__": lambda x: x.__array__(),
    "float of 3 elements": lambda x: float(x),
    "int of 3 elements": lambda x: int(x),
    "numpy.save": lambda x: numpy.save(io.BytesIO(), x),
    "numpy.testing": lambda x: numpy.testing.assert_allclose(x, x),
    "MPI buffer method": lambda x: MPI.COMM_SELF.Bcast(x, 0),
    "device + host array": lambda x: x + numpy.ones(3),
    "host array + device": lambda x: numpy.ones(3) + x,
    "numpy ufunc with a host operand": lambda x: numpy.add(x, numpy.ones(3)),
    "host array assigned into device": lambda x: x.__setitem__(slice(None), numpy.ones(3)),
    "host index array": lambda x: x[numpy.array([0, 1])],
    "xp function on a host array": lambda x: devicesim.exp(numpy.ones(3)),
    "numpy.add.at on a device array": lambda x: numpy.add.at(x, [0], 1.0),
}


@pytest.mark.parametrize("what", sorted(REFUSALS))
def test_refuses_what_cupy_refuses(what):
    with pytest.raises(TypeError):
        REFUSALS[what](device([1.0, 2.0, 3.0]))


def test_host_memory_is_hidden_and_unknown_names_are_missing():
    with pytest.raises(AttributeError, match="host memory"):
        _ = device([1.0]).data
    with pytest.raises(AttributeError, match="devicesim has no 'save'"):
        _ = devicesim.save


def test_explicit_copies_are_counted_and_device_maths_is_not(counted):
    x = device([[1.0, 2.0], [3.0, 4.0]])  # 32 bytes onto the device
    y = devicesim.exp(x) @ x.T + x.sum(axis=0) - numpy.tanh(x)  # NumPy functions stay on the device
    assert isinstance(y, devicesim.DeviceArray)
    assert dict(counted) == {"to_device": 1, "to_device_bytes": 32}
    host = devicesim.asnumpy(y)
    out = numpy.empty((2, 2))
    y.get(out=out)
    x.set(numpy.zeros((2, 2)))
    assert isinstance(host, numpy.ndarray) and numpy.array_equal(host, out)
    assert dict(counted) == {"to_device": 2, "to_device_bytes": 64, "to_host": 2, "to_host_bytes": 64}


def test_scalars_leave_the_device_only_as_counted_implicit_copies(counted):
    total = device([1.0, 2.0, 3.0]).sum()
    assert isinstance(total, devicesim.DeviceArray) and total.shape == ()  # as CuPy: a 0-d array
    assert float(total) == 6.0 and f"{total:.1f}" == "6.0" and bool(total > 5)
    assert total.item() == 6.0
    assert counted["implicit_to_host"] == 3 and counted["to_host"] == 4


def test_results_are_bitwise_numpy():
    rng = numpy.random.default_rng(0)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 3))
    ids = numpy.array([0, 2, 2, 4])
    cases = {
        "matmul": (devicesim.asarray(a) @ devicesim.asarray(b), a @ b),
        "softmax": (devicesim.exp(devicesim.asarray(a)) / devicesim.exp(devicesim.asarray(a)).sum(-1, keepdims=True),
                    numpy.exp(a) / numpy.exp(a).sum(-1, keepdims=True)),
        "add.reduceat": (devicesim.add.reduceat(devicesim.asarray(a), devicesim.asarray(ids), axis=0),
                         numpy.add.reduceat(a, ids, axis=0)),
        "fancy index": (devicesim.asarray(a)[devicesim.asarray(ids)], a[ids]),
        "where": (devicesim.where(devicesim.asarray(a) > 0, devicesim.asarray(a), 0.0), numpy.where(a > 0, a, 0.0)),
    }
    for name, (got, expected) in cases.items():
        assert numpy.array_equal(devicesim.asnumpy(got), expected), name
    in_place = devicesim.asarray(a)
    view = in_place[1:3]
    view *= 2.0  # writes through the view, as on a GPU
    devicesim.add.at(in_place, devicesim.asarray(ids), 1.0)
    expected = a.copy()
    expected[1:3] *= 2.0
    numpy.add.at(expected, ids, 1.0)
    assert numpy.array_equal(devicesim.asnumpy(in_place), expected)


def test_device_memory_never_aliases_host_memory():
    host = numpy.zeros(3)
    on_device = devicesim.asarray(host)
    host[0] = 5.0
    assert float(on_device[0]) == 0.0


TRANSPORT_CASES = [
    # name, backend, MPI reports CUDA, NCCL available, ranks per GPU, force, runs?
    ("staged", "numpy", False, False, 1, False, True),
    ("staged", "cupy", False, True, 4, False, True),
    ("staged", "devicesim", False, False, 4, False, True),
    ("cuda-aware", "numpy", True, False, 1, False, False),
    ("cuda-aware", "cupy", False, True, 1, False, False),  # the MPI does not say it can: refused
    ("cuda-aware", "cupy", False, True, 1, True, True),  # ... unless forced
    ("cuda-aware", "cupy", True, True, 2, False, True),
    ("cuda-aware", "devicesim", True, False, 1, True, False),
    ("nccl", "cupy", False, True, 1, False, True),
    ("nccl", "cupy", False, True, 2, False, False),  # NCCL refuses two ranks on one GPU
    ("nccl", "cupy", False, False, 1, False, False),
    ("nccl", "devicesim", False, False, 1, False, False),
    ("gloo", "cupy", True, True, 1, False, False),
]


@pytest.mark.parametrize("case", TRANSPORT_CASES, ids=lambda case: "-".join(map(str, case)))
def test_which_transport_can_run_where(case):
    *arguments, runs = case
    problem = transport_problem(*arguments)
    assert (problem is None) == runs, problem
    if problem is not None:
        assert ". " not in problem and "\n" not in problem, f"not one sentence: {problem!r}"


def test_devices_are_shared_round_robin_by_node_local_rank():
    assert [device_for_rank(local_rank, 8) for local_rank in range(8)] == list(range(8))
    assert [device_for_rank(local_rank, 2) for local_rank in range(5)] == [0, 1, 0, 1, 0]
    assert Placement(0, 1, 0, 4).ranks_per_gpu == 4
    assert Placement(1, 8, 1, 8).ranks_per_gpu == 1
    assert Placement(0, 2, 0, 5).ranks_per_gpu == 3  # the busiest GPU
    assert "4 ranks per GPU" in Placement(0, 1, 0, 4).describe()


def test_the_mpi_is_asked_about_cuda():
    assert isinstance(mpi_reports_cuda_support(), bool)


def test_assignment_through_repeated_indices_is_refused():
    x = devicesim.zeros(4)
    x[devicesim.asarray([0, 2])] = 1.0  # distinct: fine
    with pytest.raises(ValueError, match="repeated integer indices"):
        x[devicesim.asarray([1, 1])] = devicesim.asarray([2.0, 3.0])
    rows = devicesim.zeros((2, 3))
    rows[devicesim.arange(2), devicesim.asarray([1, 1])] -= 1.0  # pairs (0, 1), (1, 1): distinct
    assert devicesim.asnumpy(rows).tolist() == [[0.0, -1.0, 0.0], [0.0, -1.0, 0.0]]


def test_the_backend_cannot_change_inside_a_process(monkeypatch):
    from minipar.__main__ import choose_backend
    from minipar.backend import BACKEND_NAME
    from minipar.errors import ConfigError

    monkeypatch.setenv("MINIPAR_BACKEND", BACKEND_NAME)  # restored after the test
    other = "devicesim" if BACKEND_NAME == "numpy" else "numpy"
    with pytest.raises(ConfigError, match=f"--backend {other}: this process already computes with {BACKEND_NAME}"):
        choose_backend(["train", "--backend", other])
    choose_backend(["train", "--backend", BACKEND_NAME, "--steps", "1"])  # the same one: fine


def test_checkpoint_files_depend_on_the_values_only(tmp_path, monkeypatch):
    """Same arrays, same bytes, whenever they are saved (so a device run's files equal NumPy's)."""
    import time

    from minipar.checkpoint import save_checkpoint

    arrays = {"w": numpy.arange(6.0).reshape(2, 3)}
    save_checkpoint(tmp_path / "first.minipar", arrays, {"step": 1})
    monkeypatch.setattr(time, "time", lambda: 1.9e9)  # another day
    save_checkpoint(tmp_path / "later.minipar", arrays, {"step": 1})
    assert (tmp_path / "first.minipar").read_bytes() == (tmp_path / "later.minipar").read_bytes()


def test_token_ids_are_checked_with_one_copy_of_their_range():
    from minipar import backend
    from minipar.errors import DataError
    from minipar.train import check_token_ids

    inputs, targets = backend.from_host(numpy.array([[0, 3], [1, 2]])), backend.from_host(numpy.array([[1, 4]]))
    backend.reset_copy_counts()
    with pytest.raises(DataError, match=r"targets must lie in \[0, 4\), got values from 1 to 4"):
        check_token_ids(inputs, targets, 4)
    check_token_ids(inputs, inputs, 4)
    assert backend.copy_counts["to_host"] == (2 if backend.ON_DEVICE else 0)  # one per call on a device
