"""Training on devicesim: a step makes only the documented host<->device copies, and the
command line trains exactly like NumPy.

    MINIPAR_BACKEND=devicesim python -m pytest -q -m devicesim

docs/gpu.md documents a step's copies: the batch's id range and the loss out (four integers and
one float to the host) and the communication the staged transport moves (each buffer handed to MPI copied to the host, each
buffer MPI fills copied back); the batch is copied in by the caller, before the step.
The command line then trains in float64 to the same losses as NumPy and writes a checkpoint
whose files are byte for byte NumPy's.
"""
import os
import re
import subprocess
import sys

import pytest

from minipar.backend import BACKEND_NAME
from minipar.testing import PACKAGE_PARENT, find_mpiexec, results_from_ranks

pytestmark = [
    pytest.mark.devicesim,
    pytest.mark.skipif(BACKEND_NAME != "devicesim", reason="run with MINIPAR_BACKEND=devicesim (MPI jobs)"),
]

# Copies the staged transport makes for one call of MPI's built-in collectives (algorithm "mpi"),
# in a group of more than one rank: (device -> host, host -> device). The one rooted call, the
# loss broadcast from the last pipeline stage, is added per rank below.
STAGED_PER_CALL = {"allreduce": (1, 1), "iallreduce": (1, 1), "allgather": (1, 1), "reduce_scatter": (1, 1),
                   "send": (1, 0), "isend": (1, 0), "recv": (0, 1), "irecv": (0, 1), "sendrecv": (1, 1),
                   "barrier": (0, 0)}


def step_reports(layout):
    nranks = layout.get("dp", 1) * layout.get("tp", 1) * layout.get("pp", 1)
    reports = results_from_ranks(nranks, "tests.mpi_bodies.devicesim_body:step_copies_report", timeout=300,
                                 layout=layout)
    assert [report["rank"] for report in reports] == list(range(nranks))
    return reports


@pytest.mark.parametrize("layout", [dict(dp=2, tp=2), dict(dp=2, zero=2),
                                    dict(pp=2, tp=2, microbatches=2, sequence_parallel=True)], ids=str)
def test_a_step_copies_only_the_id_range_the_loss_and_the_staged_messages(layout):
    for report in step_reports(layout):
        where = f"rank {report['rank']} of {layout}"
        calls = [(call, count) for group in report["calls"] for call, count in group.items()]
        if ("broadcast", 1) in calls:  # the loss, from the last stage over the pipeline group
            calls.remove(("broadcast", 1))
            calls.append(("send" if report["last_stage"] else "recv", 1))
        unknown = [call for call, _ in calls if call not in STAGED_PER_CALL]
        assert not unknown, f"{where}: the test does not know the staged copies of {unknown}"
        to_host = 2 + sum(STAGED_PER_CALL[call][0] * count for call, count in calls)  # the ids' range, the loss
        to_device = sum(STAGED_PER_CALL[call][1] * count for call, count in calls)
        named, seen = report["named"], report["seen"]
        assert (named.get("to_host", 0), named.get("from_host", 0)) == (to_host, to_device), f"{where}: {report}"
        assert seen.get("implicit_to_host", 0) == 0 and seen.get("implicit_to_device", 0) == 0, \
            f"{where}: implicit copies (float(), printing, ...) in a step: {seen}"
        assert (seen.get("to_host", 0), seen.get("to_device", 0)) == (to_host, to_device), \
            f"{where}: copies outside backend.to_host/from_host: {seen} vs named {named}"


def train_from_the_command_line(backend, out):
    """``mpiexec -n 4 python -m minipar train --backend ... --dp 2 --tp 2 --dtype float64``: its printed
    losses and every byte of its checkpoint folder."""
    environment = {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)}
    mpiexec = find_mpiexec()
    command = [mpiexec, "-n", "4", sys.executable, "-m", "minipar", "train", "--backend", backend, "--dp", "2",
               "--tp", "2", "--dtype", "float64", "--steps", "6", "--eval-interval", "2", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    losses = re.findall(r"step \d+: train loss [0-9.]+", finished.stdout + finished.stderr)
    # ranks.json records each rank's PID (to name a killed rank): a fact of the run, not of training.
    files = {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.rglob("*"))
             if path.is_file() and path.name != "ranks.json"}
    return losses, files


def test_the_command_line_trains_on_devicesim_exactly_like_numpy(tmp_path):
    numpy_losses, numpy_files = train_from_the_command_line("numpy", tmp_path / "numpy")
    device_losses, device_files = train_from_the_command_line("devicesim", tmp_path / "devicesim")
    assert len(numpy_losses) == 3 and device_losses == numpy_losses
    assert sorted(device_files) == sorted(numpy_files) and len(numpy_files) >= 3
    for name, content in numpy_files.items():  # parameters and AdamW state, saved from device memory
        assert device_files[name] == content, f"{name} differs from NumPy's bytes"
