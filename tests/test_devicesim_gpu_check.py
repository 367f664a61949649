"""benchmarks/gpu_check.py runs end to end on the CPU stand-in (tiny shapes), so the GPU check
that nobody can run in CI is at least known to work as a program, and its equality part, run
under devicesim, must find every mode bitwise equal to NumPy."""
import json
import os
import subprocess
import sys

import pytest

from minipar.testing import PACKAGE_PARENT

pytestmark = [pytest.mark.devicesim, pytest.mark.slow]


def test_gpu_check_runs_on_devicesim(tmp_path):
    out = tmp_path / "gpu_check.json"
    environment = {**os.environ, "MINIPAR_BACKEND": "devicesim", "PYTHONPATH": str(PACKAGE_PARENT)}
    finished = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(out)],
                              cwd=PACKAGE_PARENT, env=environment, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    figures = json.loads(out.read_text())
    from benchmarks.gpu_check import CASES, TINY_SHAPES

    expected = sorted((nranks, json.dumps(case, sort_keys=True)) for nranks, cases in CASES.items() for case in cases)
    checked = sorted((row["ranks"], json.dumps(row["case"], sort_keys=True)) for row in figures["equality"])
    assert checked == expected, "every mode at 1, 2 and 4 ranks over the staged transport"
    assert all(row["equal"] and row["max_abs_diff"] == 0.0 for row in figures["equality"]), figures["equality"]
    assert sorted(figures["speed"]) == sorted(TINY_SHAPES)
    assert all(row["minipar_ms"] > 0 for row in figures["speed"].values())
    assert sorted((row["rank"], json.dumps(row["layout"])) for row in figures["memory"]) == sorted(
        [(0, "{}"), (0, '{"dp": 2, "zero": 1}'), (1, '{"dp": 2, "zero": 1}')]
        + [(rank, '{"dp": 2, "tp": 2}') for rank in range(4)])
    for row in figures["memory"]:  # parameters, gradients and AdamW state are part of what was held
        assert row["peak_bytes"] >= row["memory_report"]["total"] > 0, row
