"""Pipeline parallelism with a different activation shape at every stage boundary.

The 7-layer MLP of tests/mpi_bodies/pipeline_mlp_body.py (widths 784, 128, 127, 126, 125, 124,
123, 10; ReLU; cross-entropy) trained for a few SGD steps in float64 at p = 2 and p = 4 stages
under GPipe and 1F1B, against the same steps in one process: the rank body writes both runs'
losses and parameters, and the comparison happens here.
"""
import numpy as np
import pytest

from minipar.testing import run_on_ranks

BODY = "tests.mpi_bodies.pipeline_mlp_body:run_cases"
CASES = [["gpipe", 4], ["1f1b", 4], ["1f1b", 2]]
RTOL, ATOL = 1e-10, 1e-12


@pytest.mark.parametrize("stages", [2, 4])
def test_mlp_with_changing_widths_trains_as_one_process(stages, tmp_path):
    output = tmp_path / "results.npz"
    run_on_ranks(stages, BODY, timeout=240, cases=CASES, output_path=str(output))
    with np.load(output, allow_pickle=False) as results:
        results = dict(results)
    expected_names = sorted(key.split("/", 1)[1] for key in results if key.startswith("expected/") and key != "expected/losses")
    assert len(expected_names) == 14  # 7 layers, weight and bias each
    for schedule, microbatches in CASES:
        label = f"{schedule}-m{microbatches}"
        np.testing.assert_allclose(results[f"{label}/losses"], results["expected/losses"], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{label}: losses")
        got = {key.split("/", 1)[1]: value for key, value in results.items() if key.startswith(f"{label}/")
               and key != f"{label}/losses"}
        assert sorted(name.split("@")[0] for name in got) == expected_names, f"{label}: {sorted(got)}"
        assert len({name.split("@")[1] for name in got}) == stages, f"{label}: not every stage holds parameters"
        for name, array in got.items():
            np.testing.assert_allclose(array, results[f"expected/{name.split('@')[0]}"], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{label}: {name}")
