"""Every command the README shows runs as shown, for a few steps.

The commands come from README.md itself, read at collection time: its fenced and indented code
blocks, and the first column of its "What you get" table. So a command added to the README is
tested without touching this file, and one whose flags stop working fails here. Each runs in a
scratch folder (so ``out/`` paths resolve there), under ``mpiexec -n N`` where the README says
so. Training commands get ``--steps 2`` (the README's run is 2,000); commands that cannot run
here are skipped with the reason: installing, a GPU, the test suite itself, a server.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from minipar.testing import find_mpiexec

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FEW_STEPS = ["--steps", "2", "--eval-batches", "1"]
TIMEOUT = 600  # seconds; 8 ranks share 2 cores on the development machine


def readme_commands(text):
    """Shell commands in the README's code blocks and in its "What you get" table, in order, once each."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        commands += block.splitlines()
    commands += [line[4:] for line in text.splitlines() if line.startswith("    ") and line.strip()
                 and line.split()[0] in ("python", "mkdocs", "mpiexec", "mpirun", "pip")]
    table = text.split("## What you get", 1)[1].split("\n## ", 1)[0] if "## What you get" in text else ""
    commands += re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)
    found = []
    for line in commands:
        for part in line.split("&&"):
            part = part.split("  #")[0].strip()
            if part and re.match(PROGRAMS, part) and part not in found:  # a command, not a listing or a comment
                found.append(part)
    return found


PROGRAMS = r"(?:[A-Z_]+=\S+ )*(?:python3?|mpiexec|mpirun|pip|mkdocs) "


def skip_reason(words):
    """Why a command cannot run in this test (a sentence), or None."""
    while "=" in words[0]:  # VARIABLE=value before the program
        words = words[1:]
    program = words[words.index("python") + 1:] if "python" in words else words
    if words[0] in ("pip",) or program[:2] == ["-m", "pip"]:
        return "installs packages"
    if program[:2] == ["-m", "pytest"]:
        return "the test suite itself"
    if words[0] == "mkdocs":
        return "builds or serves the site (CI, .ci/run, builds it strictly)"
    if "--backend" in words and words[words.index("--backend") + 1] == "cupy":
        return "needs a GPU (CuPy); benchmarks/gpu_check.py is its check"
    if program[:3] == ["-m", "minipar", "calibrate"]:
        return "measures this machine for minutes (every collective at many sizes): too long for a test"
    return None


def as_run(words):
    """(command line to run, ranks): the README's command with few steps, under our mpiexec."""
    ranks = 1
    if words[0] in ("mpiexec", "mpirun"):
        ranks = int(words[words.index("-n") + 1])
        words = words[words.index("-n") + 2:]
    assert words[:3] == ["python", "-m", "minipar"], words
    command = [sys.executable, *words[1:]]
    if words[3] == "train":
        command += FEW_STEPS
    return ([find_mpiexec(), "-n", str(ranks), *command] if ranks > 1 else command), ranks


COMMANDS = readme_commands(README.read_text())

# Commands the README shows that do not run as shown, with the fix the README needs. Each is an
# expected failure (strict: once the README is fixed the command changes and the entry goes unused).
README_LINES_TO_FIX = {}  # command -> why it fails today (an expected failure that errors once the README is fixed)


def test_the_readme_shows_the_commands_this_test_expects():
    """The parsing still finds the README's main job, its single process and its table."""
    assert "mpiexec -n 8 python -m minipar train --dp 2 --tp 2 --pp 2 --zero 1 --microbatches 4" in COMMANDS
    assert "python -m minipar train" in COMMANDS
    assert sum(command.startswith(("python -m minipar", "mpiexec")) for command in COMMANDS) >= 10, COMMANDS


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder where ``out/ckpt.minipar`` exists (the README's single-process train, for a few steps)."""
    folder = tmp_path_factory.mktemp("readme")
    result = subprocess.run([sys.executable, "-m", "minipar", "train", *FEW_STEPS], cwd=folder, capture_output=True,
                            text=True, timeout=TIMEOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    return folder


def _case(command):
    words = shlex.split(command)
    reason = skip_reason(words)
    if reason:
        return pytest.param(command, marks=pytest.mark.skip(reason=reason), id=command)
    ranks = int(words[words.index("-n") + 1]) if words[0] in ("mpiexec", "mpirun") else 1
    marks = [pytest.mark.slow] if ranks > 1 else []
    if command in README_LINES_TO_FIX:
        marks.append(pytest.mark.xfail(reason=README_LINES_TO_FIX[command], strict=True))
    return pytest.param(command, marks=marks, id=command)


@pytest.mark.parametrize("command", [_case(command) for command in COMMANDS])
def test_a_readme_command_runs_as_shown(command, scratch):
    run, ranks = as_run(shlex.split(command))
    result = subprocess.run(run, cwd=scratch, capture_output=True, text=True, timeout=TIMEOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, f"{command!r} on {ranks} rank(s) exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
