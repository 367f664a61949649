"""The placement table (minipar/parallel/placement_table.py, scripts/placement_table.py): read from a
built Trainer, merged over ranks, and refusing to hide a disagreement."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipar.parallel.placement import Partial, Replicate, Shard
from minipar.parallel.placement_table import describe, markdown_table, merge_rows, placement_rows, shape_symbols

ROOT = Path(__file__).resolve().parent.parent


def test_placements_are_written_as_in_the_docs():
    assert [describe(p) for p in (Replicate(), Shard(0), Shard(1, blocks=3), Shard(None), Partial("avg"),
                                  Partial("sum", holders=(0, 3)))] == \
        ["Replicate()", "Shard(0)", "Shard(1, blocks=3)", "Shard(None)", 'Partial("avg")', 'Partial("sum", holders=(0, 3))']


def test_one_process_trainer_with_sequence_parallelism():
    from minipar.comm import Communicator
    from minipar.nn.gpt import GPTConfig
    from minipar.train import TrainConfig, Trainer

    model_config = GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=4, n_embd=32)
    trainer = Trainer(model_config, TrainConfig(steps=1, batch_size=4, sequence_parallel=True), Communicator())
    rows = merge_rows([placement_rows(trainer.named_parameters, trainer.sync.updated_tensor, ["dp", "tp"],
                                      shape_symbols(model_config))])
    table = {name: (shape, placements["tp"]) for name, shape, placements in rows}
    assert len(table) == 16 and not any(name.startswith("blocks.0.") for name in table), sorted(table)
    assert table["embedding.token.weight"] == ("(V, C)", "Shard(0)")
    assert table["embedding.position.weight"] == ("(T, C)", 'Partial("sum")')  # each tp rank saw T/tp positions
    assert table["blocks.i.attention.qkv.weight"] == ("(C, 3C)", "Shard(1, blocks=3)")
    assert table["blocks.i.mlp.output.weight"] == ("(4C, C)", "Shard(0)")
    assert table["blocks.i.mlp.output.bias"] == ("(C,)", 'Partial("sum")')
    assert {placements["dp"] for _, _, placements in rows} == {'Partial("avg")'}
    lines = markdown_table(rows, ["dp", "tp"]).splitlines()
    assert lines[0] == "| parameter | shape (whole) | dp | tp |" and len(lines) == 2 + 16


def test_merge_refuses_ranks_that_disagree():
    rank0 = [("blocks.0.mlp.hidden.bias", "(4C,)", {"tp": "Shard(0)"})]
    rank1 = [("blocks.1.mlp.hidden.bias", "(4C,)", {"tp": "Replicate()"})]
    with pytest.raises(ValueError, match=r"blocks\.i\.mlp\.hidden\.bias: rank 1 has"):
        merge_rows([rank0, rank1])
    assert merge_rows([rank0, rank0]) == [("blocks.i.mlp.hidden.bias", "(4C,)", {"tp": "Shard(0)"})]


def test_clashing_extents_keep_their_numbers():
    class Config:
        n_embd, vocab_size, block_size = 16, 16, 8

    assert shape_symbols(Config) == {48: "3C", 64: "4C", 8: "T"}


@pytest.mark.slow
def test_script_on_eight_ranks_shows_the_tied_embedding_between_the_two_ends():
    command = ["mpiexec", "-n", "8", sys.executable, "scripts/placement_table.py", "--dp", "2", "--tp", "2", "--pp", "2",
               "--sequence-parallel"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert '| `embedding.token.weight` | (V, C) | `Partial("sum", holders=(0, 1))` | `Partial("avg")` | `Shard(0)` |' \
        in done.stdout, done.stdout
