"""Pipeline parallelism: partitioning, and training equal to one process under every schedule.

The equivalence checks run on 1, 2, 4 and 8 ranks, one mpiexec launch per world size
(tests/mpi_bodies/pipeline_body.py): float64 GPT and MLP training for 3 AdamW steps under
GPipe, 1F1B and interleaved 1F1B, with and without recomputation, micro-batch counts sampled
from 1 to 16, compared parameter by parameter with single-process training on the same global
batches; every send buffer is watched, so one rewritten while its Isend is in flight fails.
The partition checks below need no MPI.
"""
import numpy as np
import pytest

from minipar.backend import set_default_dtype
from minipar.errors import ConfigError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.parallel.pipeline.executor import split_microbatches
from minipar.parallel.pipeline.partition import (
    TIED_EMBEDDING,
    chunk_piece_ranges,
    layers_per_chunk,
    partition,
    stage_parameters,
)
from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected

BODY = "tests.mpi_bodies.pipeline_body:run_checks"
TINY = dict(vocab_size=11, block_size=8, n_layer=8, n_head=2, n_embd=8, seed=7)

# [schedule, micro-batches, chunks per stage, recompute(, split)] per world size: every schedule,
# m from 1 to 16 including m < p and m not a multiple of p, recomputation on and off, a custom split.
GPT_CASES = {
    1: [["gpipe", 1, 1, False], ["gpipe", 3, 1, True], ["1f1b", 8, 1, False], ["1f1b", 16, 1, True],
        ["interleaved", 3, 2, False], ["interleaved", 16, 2, True], ["zb-h1", 4, 1, False], ["zbv", 3, 2, True]],
    2: [["gpipe", 1, 1, False], ["gpipe", 8, 1, True], ["1f1b", 3, 1, False], ["1f1b", 16, 1, True, [3, 5]],
        ["interleaved", 2, 2, False], ["interleaved", 8, 2, True], ["interleaved", 16, 2, False, [1, 3, 2, 2]],
        ["zb-h1", 1, 1, False], ["zb-h1", 6, 1, True], ["zb-h2", 3, 1, False], ["zb-h2", 8, 1, True],
        ["zbv", 2, 2, False], ["zbv", 6, 2, True, [1, 3, 2, 2]]],
    4: [["gpipe", 3, 1, False], ["gpipe", 16, 1, True], ["1f1b", 1, 1, False], ["1f1b", 8, 1, True],
        ["interleaved", 4, 2, False], ["interleaved", 16, 2, True], ["zb-h1", 8, 1, False], ["zb-h2", 8, 1, True],
        ["zbv", 8, 2, False], ["zbv", 3, 2, True]],
    8: [["gpipe", 16, 1, False], ["1f1b", 3, 1, False], ["1f1b", 8, 1, True]],
}
DEEP_GPT_CASES = {8: [["interleaved", 8, 2, False]]}  # 16 layers: p·v = 16 chunks need 16 blocks
# The zero-bubble schedules at 8 stages: slow on a shared 2-core machine, so under -m slow.
ZERO_BUBBLE_8 = dict(gpt_cases=[["zb-h1", 16, 1, False], ["zb-h2", 16, 1, True]],
                     deep_gpt_cases=[["zbv", 16, 2, True]], mlp_cases=[["zb-h1", 8, 1, False]])
MLP_CASES = {
    1: [["1f1b", 8, 1, False]],
    2: [["gpipe", 3, 1, False], ["interleaved", 4, 2, True], ["zb-h2", 4, 1, False], ["zbv", 4, 2, False]],
    4: [["1f1b", 16, 1, False], ["interleaved", 8, 2, False], ["zb-h1", 8, 1, True]],
    8: [["1f1b", 8, 1, True]],
}


@pytest.mark.parametrize("stages", [1, 2, 4, 8])
def test_pipeline_training_equals_single_process(stages):
    results = results_from_ranks(stages, BODY, timeout=240, gpt_cases=GPT_CASES[stages],
                                 deep_gpt_cases=DEEP_GPT_CASES.get(stages, []), mlp_cases=MLP_CASES[stages],
                                 tied=stages == 2, errors=True)
    checks = [f"gpt L=8 {case}" for case in GPT_CASES[stages]]
    checks += [f"gpt L=16 {case}" for case in DEEP_GPT_CASES.get(stages, [])]
    checks += [f"mlp {case}" for case in MLP_CASES[stages]]
    if stages == 2:  # both copies of the tied weight drift when their gradients are not summed
        checks += ["tied embedding", "recompute with dropout"]
    assert_as_expected(results, checks=checks + ["config errors"])


@pytest.mark.slow
def test_zero_bubble_pipelines_at_8_stages_equal_single_process():
    results = results_from_ranks(8, BODY, timeout=600, **ZERO_BUBBLE_8)
    checks = [f"gpt L=8 {case}" for case in ZERO_BUBBLE_8["gpt_cases"]]
    checks += [f"gpt L=16 {case}" for case in ZERO_BUBBLE_8["deep_gpt_cases"]]
    assert_as_expected(results, checks=checks + [f"mlp {case}" for case in ZERO_BUBBLE_8["mlp_cases"]])


# ---- partitioning (no MPI) ------------------------------------------------------------------

def test_layers_are_balanced_and_chunks_dealt_round_robin():
    assert layers_per_chunk(8, 4) == [2, 2, 2, 2]
    assert layers_per_chunk(10, 4) == [3, 3, 2, 2]
    assert layers_per_chunk(8, 2, num_chunks=2) == [2, 2, 2, 2]
    assert layers_per_chunk(8, 2, split=[1, 7]) == [1, 7]
    # 10 pieces = embedding + 8 blocks + head; the embedding joins chunk 0, the head the last chunk
    assert chunk_piece_ranges(10, 4) == [(0, 3), (3, 5), (5, 7), (7, 10)]
    assert chunk_piece_ranges(10, 2, num_chunks=2) == [(0, 3), (3, 5), (5, 7), (7, 10)]
    pieces = GPT(GPTConfig(**TINY)).pieces()
    rank1 = partition(pieces, 2, 1, num_chunks=2)
    assert [chunk.index for chunk in rank1] == [1, 3]
    assert rank1[0].pieces == pieces[3:5] and rank1[1].pieces == pieces[7:10]
    assert rank1[1].is_last and not rank1[0].is_first


def test_stage_parameters_name_by_full_name_and_list_the_tied_weight_once():
    model = GPT(GPTConfig(**TINY))
    chunks = partition(model.pieces(), 1, 0, num_chunks=2)  # embedding in chunk 0, head in chunk 1: one object
    named = stage_parameters(chunks)
    names = [name for name, _ in named]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    assert names.count(TIED_EMBEDDING) == 1
    first, last = partition(model.pieces(), 2, 0), partition(model.pieces(), 2, 1)
    assert TIED_EMBEDDING in dict(stage_parameters(first)) and TIED_EMBEDDING in dict(stage_parameters(last))
    assert "blocks.7.mlp.output.weight" in dict(stage_parameters(last))


def test_chunks_compose_to_the_whole_model():
    set_default_dtype(np.float64)
    try:
        model = GPT(GPTConfig(**TINY))
        rng = np.random.default_rng(0)
        ids, targets = rng.integers(0, 11, (3, 6)), rng.integers(0, 11, (3, 6))
        x = ids
        for chunk in sorted((c for stage in range(4) for c in partition(model.pieces(), 4, stage)),
                            key=lambda c: c.index):
            x = chunk(x, targets) if chunk.is_last else chunk(x)
        assert x.item() == model(ids, targets)[1].item()
    finally:
        set_default_dtype(np.float32)


@pytest.mark.parametrize("call, message", [
    (lambda pieces: partition(pieces, 4, 0, num_chunks=3), r"4 stages x 3 chunks = 12 chunks.*only 8 layers"),
    (lambda pieces: partition(pieces, 16, 0), r"16 stages x 1 chunks = 16 chunks.*only 8 layers"),
    (lambda pieces: partition(pieces, 3, 0, num_chunks=2), r"8 layers to be a multiple of 6"),
    (lambda pieces: partition(pieces, 2, 0, split=[3, 4]), r"split \[3, 4\] sums to 7 layers but the model has 8"),
    (lambda pieces: partition(pieces, 2, 0, split=[0, 8]), r"positive integer.*got \[0, 8\]"),
    (lambda pieces: partition(pieces, 2, 0, split=[8]), r"split has 1 entries but .* 2 chunks"),
    (lambda pieces: partition(pieces, 2, 2), r"stage must be an integer in \[0, 2\), got 2"),
    (lambda pieces: partition(pieces, 0, 0), r"num_stages must be a positive integer, got 0"),
])
def test_bad_partitions_are_refused_with_their_numbers(call, message):
    with pytest.raises(ConfigError, match=message):
        call(GPT(GPTConfig(**TINY)).pieces())


def test_microbatches_must_divide_the_batch():
    batch = np.arange(24).reshape(12, 2)
    parts = split_microbatches(batch, 3)
    assert len(parts) == 3 and all(part.shape == (4, 2) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    with pytest.raises(ConfigError, match=r"12 rows does not split into 5"):
        split_microbatches(batch, 5)
    with pytest.raises(ConfigError, match=r"positive integer, got 0"):
        split_microbatches(batch, 0)


# ---- the executor refuses what it cannot run (one process, no mpiexec) ------------------------

def test_executor_refuses_an_unknown_action_kind_before_posting_anything():
    from minipar.backend import xp
    from minipar.comm import Communicator
    from minipar.parallel.pipeline.executor import PipelineExecutor
    from minipar.parallel.pipeline.schedules import Action, build_schedule

    chunks = partition(GPT(GPTConfig(**TINY)).pieces(), 1, 0)
    actions = build_schedule("1f1b", 1, 2, 0) + [Action("recompute", 0, 0)]
    with pytest.raises(ConfigError, match=r"stage 0: the schedule holds .*'recompute'.* does not know how to run"):
        PipelineExecutor(chunks, Communicator(), "1f1b", 2, (2, 5, 8), xp.float64, actions=actions)
    executor = PipelineExecutor(chunks, Communicator(), "1f1b", 2, (2, 5, 8), xp.float64)
    executor.schedule.append(Action("recompute", 0, 0))  # slipped in after construction: refused at run time
    ids = np.zeros((4, 5), dtype=np.int64)
    with pytest.raises(ConfigError, match="does not know how to run"):
        executor.run(split_microbatches(ids, 2), split_microbatches(ids, 2))


def test_zbv_places_the_first_and_last_chunks_on_rank_zero():
    pieces = GPT(GPTConfig(**TINY)).pieces()
    ranks = [partition(pieces, 4, stage, num_chunks=2, placement="v") for stage in range(4)]
    assert [[chunk.index for chunk in chunks] for chunks in ranks] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert ranks[0][0].is_first and ranks[0][1].is_last
    assert TIED_EMBEDDING in dict(stage_parameters(ranks[0]))
    assert all(TIED_EMBEDDING not in dict(stage_parameters(chunks)) for chunks in ranks[1:])
