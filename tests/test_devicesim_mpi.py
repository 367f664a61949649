"""The Communicator on device arrays (devicesim, staged transport) against NumPy, on MPI ranks.

Run with ``MINIPAR_BACKEND=devicesim python -m pytest -q -m devicesim`` (skipped otherwise:
these launch MPI jobs). Every call, built-in and hand-built (ring, tree, recursive doubling),
must give bitwise the NumPy results and identical traffic counters, and make exactly the
copies docs/gpu.md documents for the staged transport: each buffer handed to MPI copied to
the host once, each buffer MPI fills copied back once, so a hand-built collective copies
exactly the bytes it sends and receives.
"""
import pytest

from minipar.backend import BACKEND_NAME
from minipar.testing import results_from_ranks

pytestmark = [
    pytest.mark.devicesim,
    pytest.mark.skipif(BACKEND_NAME != "devicesim", reason="run with MINIPAR_BACKEND=devicesim (MPI jobs)"),
]

HAND_BUILT = ("ring", "tree", "recursive_doubling", "send/recv", "sendrecv", "isend/irecv")


def reports(nranks, backend_name, monkeypatch):
    monkeypatch.setenv("MINIPAR_BACKEND", backend_name)
    found = results_from_ranks(nranks, "tests.mpi_bodies.devicesim_body:communicator_report", timeout=180)
    assert [report["rank"] for report in found] == list(range(nranks))
    return found


def staged_copies(name, rank, size, counters):
    """(bytes copied to the host, bytes copied back to the device) that staging one call costs."""
    if any(kind in name for kind in HAND_BUILT):  # one copy per message, each way
        return (sum(record["bytes_sent"] for record in counters.values()),
                sum(record["bytes_received"] for record in counters.values()))
    if size == 1:
        return (0, 0)  # a group of one exchanges nothing
    whole = next(iter(counters.values()))["elements"] * 8  # float64; the full (gathered) size
    return {
        "allreduce mpi": (whole, whole), "allreduce out=": (whole, whole), "iallreduce": (whole, whole),
        "allgather mpi": (whole // size, whole), "reduce_scatter mpi": (whole, whole // size),
        "broadcast mpi": (whole, 0) if rank == size - 1 else (0, whole),  # root = size - 1
        "reduce mpi": (whole, whole if rank == 0 else 0),
        "scatter": (whole if rank == 0 else 0, whole // size),
    }[name]


@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_staged_transport_equals_numpy_and_copies_what_is_documented(nranks, monkeypatch):
    on_host, on_device = reports(nranks, "numpy", monkeypatch), reports(nranks, "devicesim", monkeypatch)
    for rank in range(nranks):
        host, device = on_host[rank], on_device[rank]
        assert device["transport"] == "staged" and device["implicit"] == {}, device.get("implicit")
        assert sorted(device["calls"]) == sorted(host["calls"])
        for name, expected in host["calls"].items():
            got = device["calls"][name]
            where = f"{name} on rank {rank} of {nranks}"
            assert got["digest"] == expected["digest"], f"{where}: result differs from NumPy's"
            assert got["counters"] == expected["counters"], f"{where}: traffic counters differ"
            assert expected["copies"] == {}, f"{where}: NumPy made host<->device copies"
            copied = (got["copies"].get("to_host_bytes", 0), got["copies"].get("from_host_bytes", 0))
            assert copied == staged_copies(name, rank, nranks, got["counters"]), f"{where}: copies {got['copies']}"
