"""The command line: clear errors for bad input on every rank, no hangs, the topology picture."""
import subprocess
import sys
import textwrap

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
    assert "--batch-size 7 (the global batch) must be divisible by dp x microbatches" in result.stderr


def test_invalid_model_shape_names_the_numbers():
    result = run_cli("train", "--n-embd", "30", "--n-head", "4", "--steps", "1")
    assert result.returncode == 2 and "n_embd (30) must be divisible by n_head (4)" in result.stderr


def test_corrupt_checkpoint_for_sample(tmp_path):
    bad = tmp_path / "ckpt.minipar"
    bad.write_bytes(b"not a checkpoint at all")
    result = run_cli("sample", "--checkpoint", str(bad))
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


# ---- bad input: one clear line, said once, never a traceback --------------------------------
import json  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "8", "--eval-interval", "1000",
        "--eval-batches", "1"]


@pytest.mark.parametrize("arguments, message", [
    (["train", "--eval-interval", "0"], "argument --eval-interval: expected a positive integer, got 0"),
    (["train", "--eval-batches", "0"], "argument --eval-batches: expected a positive integer, got 0"),
    (["train", "--split", "a,b"], "--split must list blocks per pipeline chunk as positive integers"),
    (["train", "--bucket-mb", "nan"], "argument --bucket-mb: expected a finite number, got 'nan'"),
    (["train", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["train", "--lr", "-1"], "--lr must be >= 0.0, got -1.0"),
    (["train", "--weight-decay", "inf"], "argument --weight-decay: expected a finite number, got 'inf'"),
    (["train", "--micro", "4"], "unrecognized arguments: --micro 4"),
    (["train", "--zero", "4"], "argument --zero: invalid choice: 4"),
    (["sample", "--checkpoint", "x", "--temperature", "0"], "--temperature must be > 0 (or use --greedy), got 0.0"),
    (["sample", "--checkpoint", "x", "--prompt", ""], "--prompt must hold at least one character"),
    (["sample", "--checkpoint", "x", "--tokens", "-3"], "argument --tokens: expected an integer >= 0, got -3"),
])
def test_bad_input_is_one_line_without_a_traceback(arguments, message, tmp_path):
    result = run_cli(*arguments, "--out" if arguments[0] == "train" else "--seed",
                     str(tmp_path / "out") if arguments[0] == "train" else "0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(message) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error:"), result.stderr


def test_argparse_errors_are_printed_once_not_by_every_rank():
    result = run_cli("train", "--zero", "4", ranks=2, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("invalid choice: 4") == 1 and "usage:" not in result.stderr, result.stderr


def test_wrong_rank_count_is_blamed_before_the_batch_size():
    result = run_cli("train", "--dp", "3", "--steps", "1", ranks=2, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("dp x tp x pp = 3 x 1 x 1 = 3 does not equal the number of MPI ranks (2)") == 1
    assert "batch" not in result.stderr


def test_out_that_cannot_be_written_is_found_before_step_1(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("train", "--steps", "5", "--out", str(blocker / "out"), *TINY)
    assert result.returncode == 2 and "is not a writable folder" in result.stderr, result.stderr
    assert "step" not in result.stdout


# ---- periodic checkpoints, exact resume -----------------------------------------------------
def index_of(path):
    return json.loads((Path(path) / "index.json").read_text())


def test_any_split_of_a_run_gives_the_losses_of_the_uninterrupted_run(tmp_path):
    """20 + 20 steps with the cosine active (warmup 5, 40 in all) equal 40 straight steps, bit for bit."""
    schedule = ["--steps", "40", "--warmup", "5", *TINY]
    assert run_cli("train", *schedule, "--out", str(tmp_path / "a")).returncode == 0
    first = run_cli("train", *schedule, "--stop-after", "20", "--out", str(tmp_path / "b"))
    assert first.returncode == 0, first.stderr
    assert index_of(tmp_path / "b" / "ckpt.minipar")["step"] == 20
    # The schedule travels in the checkpoint: resuming needs no --steps/--warmup.
    second = run_cli("train", *TINY, "--resume", str(tmp_path / "b" / "ckpt.minipar"), "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    straight = index_of(tmp_path / "a" / "ckpt.minipar")["history"]["train_loss"]
    split = index_of(tmp_path / "b" / "ckpt.minipar")["history"]["train_loss"]
    assert len(straight) == 40 and split == straight


def test_resuming_past_the_requested_steps_says_so(tmp_path):
    assert run_cli("train", "--steps", "4", *TINY, "--out", str(tmp_path)).returncode == 0
    result = run_cli("train", "--steps", "3", *TINY, "--resume", str(tmp_path / "ckpt.minipar"),
                     "--out", str(tmp_path))
    assert result.returncode == 2 and "is at step 4, and this run ends at step 3: nothing left to train" in result.stderr


def test_periodic_saves_keep_the_last_k_and_clean_up_after_interrupted_saves(tmp_path):
    stale = tmp_path / ".ckpt.minipar.partial-deadbeef"
    stale.mkdir()
    (stale / "shard-rank-00000.minipar").write_bytes(b"half a shard")
    result = run_cli("train", "--steps", "7", "--save-every", "2", "--keep", "2", *TINY, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-step-000006.minipar", "ckpt.minipar",
                                                             "ranks.json"]  # rank -> PID (minipar/job.py)
    assert index_of(tmp_path / "ckpt.minipar")["step"] == 7
    assert index_of(tmp_path / "ckpt-step-000006.minipar")["step"] == 6
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_path / "ckpt.minipar", *(tmp_path / "ckpt.minipar").iterdir()]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_cp_layout_that_does_not_cut_the_sequence_is_refused_in_one_sentence(tmp_path):
    result = run_cli("train", "--cp", "2", "--cp-layout", "zigzag", "--steps", "1", "--out", str(tmp_path),
                     ranks=2, timeout=60)
    assert result.returncode != 0
    expected = ("error: sequence length 10 does not split into the 4 equal chunks that cp 2 with the zigzag "
                "layout needs; use a multiple of 4")
    assert result.stderr.count(expected) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_ep_without_experts_is_refused(tmp_path):
    result = run_cli("train", "--ep", "2", "--steps", "1", "--out", str(tmp_path), ranks=2, timeout=60)
    assert result.returncode != 0
    assert "--ep 2 shards the experts of a mixture of experts: add --experts E" in result.stderr, result.stderr


def test_train_parses_without_importing_the_planner_or_the_course():
    """Only the chosen command's arguments are defined (``__main__.build_parser``): every rank of a training
    job parses ``train`` without loading the planner or the course, and each command still parses its flags."""
    probe = textwrap.dedent("""
        import sys
        from minipar.__main__ import COMMANDS, build_parser, parse_arguments

        def loaded():
            return sorted(name for name in sys.modules if name.startswith(("minipar.plan", "minipar.course")))

        train = parse_arguments(["train", "--dp", "2", "--microbatches", "4"])
        sample = parse_arguments(["sample", "--checkpoint", "ckpt"])
        usage = build_parser(["--help"]).format_help()
        print(loaded(), train.dp, train.microbatches, sample.checkpoint, all(name in usage for name in COMMANDS))
        plan = parse_arguments(["plan", "--gpus", "8"])
        print(plan.gpus, "minipar.plan.cli" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[] 2 4 ckpt True", "8 True"], result.stdout
