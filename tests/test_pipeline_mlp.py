"""Pipeline parallelism with a different activation shape at every stage boundary.

The 7-layer MLP of tests/mpi_bodies/pipeline_mlp_body.py (widths 784, 128, 127, 126, 125, 124,
123, 10; ReLU; cross-entropy) trained for a few SGD steps in float64 at p = 2 and p = 4 stages
under GPipe and 1F1B, against the same steps in one process: the ranks return their comparisons
(losses and every parameter, by name) and pytest judges them.
"""
import pytest

from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected

BODY = "tests.mpi_bodies.pipeline_mlp_body:run_cases"
CASES = [["gpipe", 4], ["1f1b", 4], ["1f1b", 2]]


@pytest.mark.parametrize("stages", [2, 4])
def test_mlp_with_changing_widths_trains_as_one_process(stages):
    results = results_from_ranks(stages, BODY, timeout=240, cases=CASES)
    labels = [f"p={stages} {schedule} m={microbatches}" for schedule, microbatches in CASES]
    assert_as_expected(results, checks=labels)
    # 7 layers x (weight, bias) spread over the stages, the losses on the last, the name check on rank 0
    compared = sum(len(report["comparisons"]) for report in results)
    assert compared == len(CASES) * (14 + 1 + 1), f"{compared} comparisons: {results}"
