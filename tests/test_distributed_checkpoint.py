"""Distributed checkpoints: resume under another layout, atomic saves, every kind of bad input, the CLI.

The MPI parts run in tests/mpi_bodies/checkpoint_body.py; a tmp folder is handed to every rank.
"""
import json
import os
import subprocess
import sys

import pytest

from minipar.backend import to_host, xp
from minipar.data import CharTokenizer
from minipar.errors import CheckpointError
from minipar.parallel import distributed_checkpoint
from minipar.parallel.checkpoint_index import read_index
from minipar.parallel.distributed_checkpoint import load_single_process_model
from minipar.testing import PACKAGE_PARENT, find_mpiexec, results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected

BODY = "tests.mpi_bodies.checkpoint_body"


def test_chain_of_layouts_equals_one_uninterrupted_run(tmp_path):
    """2x2x2 (pipeline micro-batches) -> 1x4x2 (sequence parallel) -> 8x1x1 -> 1x1x1, 2 steps each."""
    segments = [dict(dp=2, tp=2, pp=2, microbatches=2, steps=2),
                dict(tp=4, pp=2, microbatches=4, schedule="gpipe", sequence_parallel=True, steps=2),
                dict(dp=8, steps=2)]
    results = results_from_ranks(8, f"{BODY}:run_chain", timeout=120, folder=str(tmp_path), segments=segments,
                                 total_steps=8)
    assert_as_expected(results, checks=["segment 0", "segment 1", "segment 2"])
    files = sorted(os.listdir(tmp_path / "after-2"))
    # 2x2x2: data-parallel replica 0 writes (ranks 0, 1 on stage 0; 4, 5 on stage 1), rank 0 the index.
    expected = ["index.json"] + [f"shard-rank-{r:05d}.minipar" for r in (0, 1, 4, 5)]
    assert files == expected, f"files written under 2x2x2: expected {expected}, got {files}"
    results = results_from_ranks(1, f"{BODY}:finish_chain_single_process", timeout=60, folder=str(tmp_path),
                                 steps=2, total_steps=8)
    assert_as_expected(results, checks=["chain of 8 steps"])


def test_resume_on_four_ranks(tmp_path):
    cases = [  # (layout A, layout B, steps before, steps after)
        (dict(tp=2, pp=2, microbatches=4), dict(tp=2, pp=2, microbatches=4), 2, 2),  # same layout: bit for bit
        (dict(dp=2, tp=2, sequence_parallel=True), dict(pp=4, microbatches=4, schedule="gpipe"), 2, 2),
        (dict(dp=2, pp=2, microbatches=2, schedule="interleaved", virtual_stages=2), dict(tp=4, sequence_parallel=True),
         1, 2),
        # ZeRO: the moments live in dp-sharded parts; the Trainer hands them over tp-shard shaped.
        (dict(dp=2, tp=2, zero=2, microbatches=2), dict(dp=4, zero=1), 2, 2),
        (dict(dp=4, zero=3), dict(dp=4, zero=3), 2, 2),  # same layout, bit for bit
    ]
    results = results_from_ranks(4, f"{BODY}:resume_cases", timeout=120, folder=str(tmp_path), cases=cases,
                                 total_steps=4)
    assert_as_expected(results, checks=[f"{a} -> {b}" for a, b, _, _ in cases])


def test_resume_context_parallel_on_four_ranks(tmp_path):
    """cp runs save and resume like any other (every parameter is whole on the cp ranks)."""
    cases = [(dict(dp=2, cp=2, cp_layout="zigzag"), dict(dp=2, cp=2, cp_layout="zigzag"), 2, 2),  # bit for bit
             (dict(dp=2, cp=2, cp_layout="zigzag"), dict(cp=4, cp_attention="allgather"), 2, 2),
             (dict(tp=2, cp=2), dict(dp=4), 1, 2)]
    results = results_from_ranks(4, f"{BODY}:resume_cases", timeout=180, folder=str(tmp_path), cases=cases,
                                 total_steps=4)
    assert_as_expected(results, checks=[f"{a} -> {b}" for a, b, _, _ in cases])


def test_resume_expert_parallel_on_four_ranks(tmp_path):
    """ep runs: each ep rank writes its experts (Shard on axis 0, index = ep rank), and any layout with
    as many data ranks reads them back, resharded (a mixture of experts routes each data rank's tokens
    as one group, so the one-process reference routes 4 micro-batches)."""
    experts = dict(n_experts=4, top_k=2, capacity_factor=2.0, aux_loss_weight=0.01)
    cases = [(dict(dp=2, ep=2), dict(dp=2, ep=2), 2, 2),  # same layout: bit for bit
             (dict(dp=2, ep=2), dict(ep=4), 2, 2),
             (dict(ep=4), dict(dp=4), 1, 2)]
    results = results_from_ranks(4, f"{BODY}:resume_cases", timeout=180, folder=str(tmp_path), cases=cases,
                                 total_steps=4, model=experts, reference_microbatches=4)
    assert_as_expected(results, checks=[f"{a} -> {b}" for a, b, _, _ in cases])
    index = json.loads((tmp_path / "case-1" / "index.json").read_text())
    assert index["layout"] == {"dp": 2, "tp": 1, "pp": 1, "ep": 2}, index["layout"]
    shards = index["arrays"]["model/blocks.0.mlp.experts.hidden.weight"]["shards"]
    assert [(s["index"], s["count"]) for s in shards] == [(0, 2), (1, 2)], shards


def test_failed_save_keeps_previous_checkpoint_and_names_the_rank(tmp_path):
    results = results_from_ranks(4, f"{BODY}:failed_save_keeps_previous", timeout=60, folder=str(tmp_path))
    assert_as_expected(results, checks=["atomic save"])


def test_corrupt_checkpoints_fail_alike_on_every_rank(tmp_path):
    results = results_from_ranks(4, f"{BODY}:corrupt_checkpoints", timeout=90, folder=str(tmp_path))
    assert_as_expected(results, checks=["flipped", "truncated", "swapped", "missing-shard", "missing-index",
                                        "missing-folder", "untiled", "other-shape"])


def test_crash_between_the_two_renames_leaves_both_checkpoints_and_a_hint(tmp_path, monkeypatch):
    old, new = tmp_path / "ckpt", tmp_path / ".ckpt.partial-abc123"
    for folder, step in ((old, 1), (new, 2)):
        folder.mkdir()
        (folder / "index.json").write_text(json.dumps({"step": step}))
    real_rename, calls = os.rename, []

    def rename_then_crash(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")  # the process dies between the two renames
        real_rename(source, target)

    monkeypatch.setattr(distributed_checkpoint.os, "rename", rename_then_crash)
    with pytest.raises(KeyboardInterrupt):
        distributed_checkpoint._swap_into_place(new, old)
    monkeypatch.undo()
    aside = tmp_path / ".ckpt.old-abc123"
    assert json.loads((aside / "index.json").read_text()) == {"step": 1}  # the old one, whole, aside
    assert json.loads((new / "index.json").read_text()) == {"step": 2}  # the new one, whole, not yet in place
    with pytest.raises(CheckpointError, match="interrupted mid-swap.*ckpt.old-abc123.*rename it to"):
        read_index(old)


def run_cli(*arguments, cwd, ranks=None):
    environment = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    command = [sys.executable, "-m", "minipar", *arguments]
    if ranks is not None:
        command = [find_mpiexec(), "-n", str(ranks), *command]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=120)


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-batches", "1", "--eval-interval", "100", "--dtype", "float64"]


def test_cli_train_resume_under_another_layout_and_sample(tmp_path):
    first = run_cli("train", "--steps", "2", "--tp", "2", *TINY, ranks=2, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    checkpoint = tmp_path / "out" / "ckpt.minipar"
    assert "checkpoint written to out/ckpt.minipar (step 2)" in first.stdout
    assert read_index(checkpoint)["layout"] == {"dp": 1, "tp": 2, "pp": 1}
    second = run_cli("train", "--steps", "4", "--resume", str(checkpoint), *TINY, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(step 4)" in second.stdout and read_index(checkpoint)["step"] == 4
    sampled = run_cli("sample", "--checkpoint", str(checkpoint), "--prompt", "12+", "--greedy", "--tokens", "3",
                      cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    # The same greedy continuation, computed here from the checkpoint loaded into one process.
    model, index = load_single_process_model(checkpoint)
    tokenizer = CharTokenizer.from_dict(index["tokenizer"])
    continuation = model.generate(xp.asarray([tokenizer.encode("12+")]), 3, greedy=True)
    assert sampled.stdout == tokenizer.decode(to_host(continuation[0])) + "\n"


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path):
    result = run_cli("sample", "--checkpoint", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no checkpoint folder at {str(tmp_path / 'nowhere')!r}"


FIXTURES = PACKAGE_PARENT / "tests" / "fixtures"


@pytest.mark.parametrize("nranks, layout", [
    (8, dict(dp=2, tp=2, pp=2, microbatches=2, sequence_parallel=True)),  # the layout it was written under
    (4, dict(tp=2, pp=2, microbatches=2)),
])
def test_checkpoint_written_before_the_mesh_loads(nranks, layout):
    """A checkpoint from the code before parallel/mesh.py (tests/fixtures/make_checkpoint_before_mesh.py):
    the ranks keep their order, so it loads, and the next step equals the one that code took."""
    results = results_from_ranks(nranks, f"{BODY}:checkpoint_before_mesh_loads", timeout=120,
                                 fixture=str(FIXTURES), layout=layout)
    assert_as_expected(results, checks=["checkpoint before the mesh"])
