"""Zero-bubble schedules (ZB-H1, ZB-H2, ZB-V) train exactly like one process.

Each case runs the Trainer with the schedule (B and W split by the engine, W run when the schedule
says) for 3 AdamW steps in float64 and compares losses and every parameter with the plain
single-process loop of tests/mpi_bodies/equivalence_body.py, with the same tolerances as the
other layouts (``test_equivalence.assert_same_training``). pp = 2, 4 and 8, with dp, tp (and
sequence parallelism), recomputation on and off, ZeRO 1, and data-parallel overlap (its buckets
fill from grad-ready hooks, which fire in W). The 8-rank cases are slow here and marked so.
"""
import pytest

from minipar.testing import results_from_ranks
from tests.test_equivalence import assert_same_training

# ZB-V holds 2 chunks per rank, so pp = 8 needs 16 layers (one per chunk at least).
DEEP = dict(vocab_size=16, block_size=8, n_layer=16, n_head=2, n_embd=8)

CASES = {
    2: [dict(pp=2, microbatches=4, schedule="zb-h1"),
        dict(pp=2, microbatches=4, schedule="zb-h2", recompute=True),
        dict(pp=2, microbatches=4, schedule="zbv")],
    4: [dict(pp=4, microbatches=8, schedule="zbv"),
        dict(pp=4, microbatches=8, schedule="zb-h1", recompute=True),
        dict(pp=4, microbatches=4, schedule="zb-h2"),
        dict(dp=2, pp=2, microbatches=4, schedule="zbv", zero=1, weight_decay=0.1),
        dict(dp=2, pp=2, microbatches=4, schedule="zb-h1", overlap=True, bucket_megabytes=0.005),
        dict(tp=2, pp=2, microbatches=4, schedule="zbv", sequence_parallel=True, recompute=True),
        dict(tp=2, pp=2, microbatches=2, schedule="zb-h2")],
    8: [dict(pp=8, microbatches=16, schedule="zb-h1"),
        dict(pp=8, microbatches=8, schedule="zb-h2", recompute=True),
        dict(pp=8, microbatches=16, schedule="zbv", model=DEEP),
        dict(dp=2, pp=4, microbatches=8, schedule="zbv", zero=1, weight_decay=0.1, recompute=True),
        dict(dp=2, tp=2, pp=2, microbatches=4, schedule="zb-h2", sequence_parallel=True, zero=1),
        dict(tp=2, pp=4, microbatches=4, schedule="zb-h1", sequence_parallel=True, recompute=True)],
}


@pytest.mark.parametrize("world_size", [2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_zero_bubble_schedules_equal_single_process(world_size):
    cases = CASES[world_size]
    results = results_from_ranks(world_size, "tests.mpi_bodies.equivalence_body:check_layouts", timeout=900,
                                 cases=cases)
    assert_same_training(cases, results[0])
