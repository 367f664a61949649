"""The core check: every parallel layout trains exactly like one process.

For world sizes 1, 2, 4 and 8, every factorisation into dp x tp x pp, plus the options
of each mode (micro-batches, schedules, recomputation, sequence parallelism, bucketing and
overlap, hand-built allreduces), trains a GPT for 3 AdamW steps (float64, clipping and the
cosine schedule on) through minipar.train.Trainer. Rank 0 gathers the shards back into a
single-process state dict and compares losses and every parameter with a plain,
independently written single-process loop (tests/mpi_bodies/equivalence_body.py).
"""
import itertools

import pytest

from minipar.testing import results_from_ranks


def factorisations(world_size):
    return [dict(dp=dp, tp=tp, pp=pp) for dp, tp, pp in itertools.product(range(1, world_size + 1), repeat=3)
            if dp * tp * pp == world_size]


def with_microbatches(layout):
    """Enough micro-batches to keep every stage busy, within the global batch of 16."""
    return {**layout, "microbatches": min(16 // layout["dp"], max(2, 2 * layout["pp"]))}


OPTIONS = {
    1: [dict(microbatches=4), dict(microbatches=3, batch_size=12, recompute=True)],
    2: [dict(pp=2, microbatches=4, schedule="gpipe"),
        dict(pp=2, microbatches=4, schedule="interleaved", virtual_stages=2, recompute=True),
        dict(tp=2, sequence_parallel=True),
        dict(dp=2, overlap=True, bucket_megabytes=0.01, microbatches=2),
        dict(dp=2, allreduce="ring"), dict(dp=2, allreduce="recursive_doubling"), dict(dp=2, allreduce="tree"),
        dict(dp=2, allreduce="hierarchical", ranks_per_node=1)],
    4: [dict(pp=4, microbatches=8, schedule="interleaved", virtual_stages=2),
        dict(pp=4, microbatches=5, batch_size=15, schedule="gpipe", recompute=True),
        dict(tp=4, sequence_parallel=True),
        dict(dp=2, tp=2, sequence_parallel=True, overlap=True, bucket_megabytes=0.005, microbatches=2),
        dict(dp=4, allreduce="ring", bucket_megabytes=0.02),
        dict(dp=2, pp=2, microbatches=2, split=[3, 5]),
        dict(dp=4, allreduce="hierarchical", ranks_per_node=2)],
    8: [dict(dp=2, tp=2, pp=2, microbatches=4, schedule="interleaved", virtual_stages=2, sequence_parallel=True,
             overlap=True),
        dict(pp=8, microbatches=16, schedule="gpipe", recompute=True),
        dict(dp=8, overlap=True, bucket_megabytes=0.01),
        dict(tp=8, sequence_parallel=True),
        dict(dp=4, tp=2, allreduce="hierarchical", ranks_per_node=4, microbatches=2)],
}


def assert_dtypes_explicit(report):
    """The Trainer took float64 from its TrainConfig while the process default stayed float32."""
    got = {key: report[key] for key in ("parameter_dtypes", "default_dtype_after")}
    assert got == {"parameter_dtypes": ["float64"], "default_dtype_after": "float32"}, report["case"]


def assert_same_training(cases, reported):
    """Each case: every rank's losses equal one process's (relative 1e-11), and every parameter
    within its tolerance (``equivalence_body.compare_states``)."""
    assert [r["case"] for r in reported] == cases
    for r in reported:
        case = r["case"]
        assert_dtypes_explicit(r)
        for rank, losses in enumerate(r["losses_by_rank"]):
            assert losses == pytest.approx(r["reference_losses"], rel=1e-11, abs=0), (case, rank)
            assert losses == pytest.approx(r["losses_by_rank"][0], rel=1e-12, abs=0), (case, rank)
        assert r["names"] == r["reference_names"], case
        for name, ratio in r["parameter_tolerance_ratio"].items():
            assert ratio <= 1.0, (case, name, f"largest difference {r['parameter_error'][name]}")


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_layout_equals_single_process(world_size):
    cases = [with_microbatches(layout) for layout in factorisations(world_size)] + OPTIONS[world_size]
    results = results_from_ranks(world_size, "tests.mpi_bodies.equivalence_body:check_layouts", timeout=600,
                                 cases=cases)
    assert_same_training(cases, results[0])


# ZeRO (parallel/zero.py) shards over the data-parallel group, so every factorisation with
# dp >= 2 runs under stages 1, 2 and 3 (dp = 1 is plain training, covered above); tensor-parallel
# layouts turn sequence parallelism on, whose gradient sum then runs on the ZeRO parts, and
# weight decay is on, so AdamW's decay of the parts is checked too.
# PADDED is a model whose sizes the dp ranks do not divide (15 = 3 x 5), so parts are padded.
PADDED = dict(vocab_size=15, block_size=6, n_layer=2, n_head=3, n_embd=15)
# --overlap: reduce-scatters started during backward (every stage), stage 3 prefetching the
# next piece's all-gather; with micro-batches, stages 2-3 reduce-scatter after each of them.
ZERO_OPTIONS = {
    2: [dict(dp=2, zero=2, model=PADDED), dict(dp=2, zero=3, model=PADDED, microbatches=3, batch_size=12),
        dict(dp=2, zero=1, microbatches=2),
        *(dict(dp=2, zero=stage, overlap=True, microbatches=2) for stage in (1, 2, 3)),
        dict(dp=2, zero=3, overlap=True, model=PADDED, microbatches=3, batch_size=12)],
    4: [dict(dp=2, pp=2, zero=3, microbatches=4, schedule="interleaved", virtual_stages=2, recompute=True),
        dict(dp=4, zero=3, model=PADDED), dict(dp=2, tp=2, zero=2, microbatches=2),
        dict(dp=2, pp=2, zero=2, microbatches=4, schedule="gpipe", recompute=True), dict(dp=1, pp=4, zero=3),
        dict(dp=4, zero=1, overlap=True, model=PADDED), dict(dp=4, zero=2, overlap=True, microbatches=2),
        dict(dp=2, pp=2, zero=3, overlap=True, microbatches=4, schedule="interleaved", virtual_stages=2),
        dict(dp=2, tp=2, zero=3, overlap=True, sequence_parallel=True, microbatches=2)],
    8: [dict(dp=4, pp=2, zero=3, model=PADDED, microbatches=2), dict(dp=2, pp=4, zero=3, schedule="gpipe"),
        dict(dp=8, zero=2, overlap=True, microbatches=2), dict(dp=4, pp=2, zero=3, overlap=True, microbatches=2),
        dict(dp=2, tp=2, pp=2, zero=1, overlap=True, microbatches=4, sequence_parallel=True)],
}


def zero_cases(world_size):
    cases = []
    for layout in factorisations(world_size):
        if layout["dp"] > 1:
            extra = {"sequence_parallel": True} if layout["tp"] > 1 else {}
            cases += [{**with_microbatches(layout), **extra, "zero": stage} for stage in (1, 2, 3)]
    return [{**case, "weight_decay": 0.1} for case in cases + ZERO_OPTIONS[world_size]]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_every_layout_with_zero_equals_single_process(world_size):
    cases = zero_cases(world_size)
    results = results_from_ranks(world_size, "tests.mpi_bodies.equivalence_body:check_layouts", timeout=600,
                                 cases=cases)
    assert_same_training(cases, results[0])


# Gradients and the global norm right after the executor and the gradient sums, before AdamW:
# dp (with overlap), tp with sequence parallelism, pp with micro-batches (the 1/m), the tied
# embedding across stages, ZeRO 1-3 (the norm sums parts over dp), and the padded model.
GRADIENT_CASES = {
    1: [dict(microbatches=4)],
    2: [dict(dp=2, microbatches=2), dict(dp=2, overlap=True, bucket_megabytes=0.01), dict(tp=2),
        dict(tp=2, sequence_parallel=True), dict(pp=2, microbatches=4),
        dict(dp=2, zero=1, microbatches=2), dict(dp=2, zero=2, microbatches=2), dict(dp=2, zero=3, microbatches=2),
        dict(dp=2, zero=3, model=PADDED, batch_size=12, microbatches=3),
        *(dict(dp=2, zero=stage, overlap=True, microbatches=2) for stage in (1, 2, 3))],
    4: [dict(dp=2, tp=2, sequence_parallel=True, zero=3), dict(dp=2, pp=2, zero=2, microbatches=4),
        dict(tp=2, pp=2, sequence_parallel=True, microbatches=2),
        dict(pp=4, microbatches=8, schedule="interleaved", virtual_stages=2),
        dict(dp=4, zero=1, model=PADDED)],
}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_gradients_and_norm_equal_single_process_before_the_update(world_size):
    check_gradient_cases(world_size, GRADIENT_CASES[world_size])


def check_gradient_cases(world_size, cases):
    """Loss, ||g||² and every gradient of each case, before the update, against one process (rel 1e-12)."""
    reported = results_from_ranks(world_size, "tests.mpi_bodies.equivalence_body:check_gradients", timeout=600,
                                  cases=cases)[0]
    assert [r["case"] for r in reported] == cases
    for r in reported:
        case = r["case"]
        assert_dtypes_explicit(r)
        assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-12, abs=0), case
        assert r["norm_squared"] == pytest.approx(r["reference_norm_squared"], rel=1e-12, abs=0), case
        assert r["names"] == r["reference_names"], case
        for name, error in r["gradient_error"].items():
            # A parameter whose exact gradient is 0 (the key bias) holds rounding noise only.
            assert error <= 1e-12 * r["gradient_scale"][name] + 1e-15, (case, name, error, r["gradient_scale"][name])
