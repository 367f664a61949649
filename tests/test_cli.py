"""The command line: clear errors for bad input on every rank, no hangs, the topology picture."""
import subprocess
import sys

from minipar.testing import find_mpiexec


def run_cli(*arguments, ranks=None, timeout=120):
    command = [sys.executable, "-m", "minipar", *arguments]
    if ranks:
        command = [find_mpiexec(sys.executable), "-n", str(ranks), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_topology_draws_the_grid():
    result = run_cli("topology", "--dp", "2", "--tp", "2", "--pp", "2")
    assert result.returncode == 0, result.stderr
    assert "stage 0: dp0[  0  1 ]   dp1[  2  3 ]" in result.stdout
    assert "stage 1: dp0[  4  5 ]   dp1[  6  7 ]" in result.stdout


def test_missing_data_file_is_one_clear_line():
    result = run_cli("train", "--data", "/nonexistent/shakespeare.txt", "--steps", "1")
    assert result.returncode == 2
    assert "error: data file '/nonexistent/shakespeare.txt' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_layout_that_does_not_match_the_world_fails_on_every_rank_without_hanging():
    result = run_cli("train", "--dp", "4", "--steps", "1", ranks=2, timeout=60)
    assert result.returncode != 0
    assert "dp x tp x pp = 4 x 1 x 1 = 4 does not equal the number of MPI ranks (2)" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_not_divisible_by_data_parallel_ranks_is_refused():
    result = run_cli("train", "--dp", "2", "--batch-size", "7", "--steps", "1", ranks=2, timeout=60)
    assert result.returncode != 0
    assert "global batch size 7 must be divisible by dp x microbatches" in result.stderr


def test_invalid_model_shape_names_the_numbers():
    result = run_cli("train", "--n-embd", "30", "--n-head", "4", "--steps", "1")
    assert result.returncode == 2 and "n_embd (30) must be divisible by n_head (4)" in result.stderr


def test_corrupt_checkpoint_for_sample(tmp_path):
    bad = tmp_path / "ckpt.minipar"
    bad.write_bytes(b"not a checkpoint at all")
    result = run_cli("sample", "--checkpoint", str(bad))
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr
