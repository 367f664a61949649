"""Context parallelism (--cp) and expert parallelism (--ep) through the Trainer equal one process.

The machinery of tests/test_equivalence.py (tests/mpi_bodies/equivalence_body.py): each layout
trains a GPT for 3 AdamW steps in float64 (clipping, weight decay and the cosine schedule on),
gathers its shards on rank 0 and compares every loss and parameter with a plain single-process
loop; a second set compares the gradients and the global norm right after the gradient sums.

cp: both layouts (contiguous, zigzag), both attention variants (ring, with and without overlap,
and all-gather), at cp = 2, 4, 8, and combined with dp, tp (with sequence parallelism), pp and
ZeRO; with dropout 0.1 too (each cp rank keeps its positions of one process's mask). ep: a
mixture of experts in every block, its experts sharded over ep = 2, 4, 8 ranks carved out of
the data dimension, with dp, tp, pp and ZeRO. A mixture of experts counts capacity and its
balance loss per group of tokens; the reference cuts its batch into the layout's groups, one
per data rank and micro-batch (``equivalence_body.routing_groups``), so cases with drops
(capacity factor 1) are compared too; the others have room for every token.
"""
import pytest

from minipar.testing import results_from_ranks
from tests.test_equivalence import assert_same_training, check_gradient_cases

LONG = {"block_size": 16}  # zigzag at cp 8 cuts the sequence into 16 chunks
NO_DROPS = {"n_experts": 4, "top_k": 2, "capacity_factor": 2.0, "aux_loss_weight": 0.01}  # CF = E/k: room for all
DROPS = {**NO_DROPS, "capacity_factor": 1.0}
EIGHT = {**NO_DROPS, "n_experts": 8, "capacity_factor": 4.0}

QUICK = {
    1: [dict(model=NO_DROPS), dict(microbatches=2, model=DROPS)],  # the MoE GPT through the Trainer, ep = cp = 1
    2: [dict(dp=2, model=DROPS), dict(cp=2), dict(cp=2, cp_layout="zigzag", cp_attention="allgather"),
        dict(cp=2, cp_layout="zigzag", cp_overlap=True), dict(cp=2, cp_layout="zigzag", model={"dropout": 0.1}),
        dict(ep=2, model=NO_DROPS),
        dict(ep=2, microbatches=2, model=DROPS)],
    4: [dict(cp=4, cp_layout="zigzag", cp_overlap=True), dict(cp=4, cp_attention="allgather"),
        dict(dp=2, cp=2, cp_layout="zigzag", microbatches=2), dict(ep=4, model=NO_DROPS),
        dict(cp=2, tp=2, sequence_parallel=True, cp_layout="zigzag", model={"dropout": 0.1}),
        dict(dp=2, ep=2, model=DROPS)],
}
SLOW = {
    8: [dict(cp=8, model=LONG), dict(cp=8, cp_layout="zigzag", cp_overlap=True, model=LONG),
        dict(cp=8, cp_attention="allgather", model=LONG),
        dict(cp=8, cp_layout="zigzag", cp_attention="allgather", model=LONG),
        dict(dp=2, cp=2, tp=2, cp_layout="zigzag"),
        dict(dp=2, cp=2, tp=2, cp_layout="zigzag", sequence_parallel=True, cp_attention="allgather"),
        dict(cp=2, pp=2, dp=2, microbatches=2, cp_layout="zigzag", cp_overlap=True),
        dict(cp=2, dp=4, zero=3, cp_layout="zigzag"),
        dict(ep=8, model=EIGHT), dict(dp=2, ep=4, model=EIGHT), dict(dp=2, ep=2, tp=2, model=NO_DROPS),
        dict(ep=2, pp=2, dp=2, microbatches=2, model=NO_DROPS), dict(dp=4, ep=2, zero=2, model=DROPS)],
}

GRADIENT_CASES = {
    2: [dict(cp=2, cp_layout="zigzag"), dict(ep=2, model=DROPS)],
    4: [dict(dp=2, cp=2, cp_attention="allgather"), dict(dp=2, ep=2, microbatches=2, model=NO_DROPS),
        dict(ep=2, pp=2, microbatches=2, model=NO_DROPS)],
}


def check(world_size, cases):
    results = results_from_ranks(world_size, "tests.mpi_bodies.equivalence_body:check_layouts", timeout=900,
                                 cases=cases)
    assert_same_training(cases, results[0])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_cp_and_ep_layouts_equal_single_process(world_size):
    check(world_size, QUICK[world_size])


@pytest.mark.slow
def test_cp_and_ep_layouts_equal_single_process_8_ranks():
    check(8, SLOW[8])


@pytest.mark.parametrize("world_size", [2, 4])
def test_cp_and_ep_gradients_and_norm_before_the_update(world_size):
    check_gradient_cases(world_size, GRADIENT_CASES[world_size])
