"""Tensor parallelism (Megatron) and sequence parallelism equal the single-process GPT.

On 1, 2, 4 and 8 ranks (one mpiexec launch each, see tests/mpi_bodies/tensor_parallel_body.py),
with and without sequence parallelism, in float64:
  - the pieces are exact slices of the single-process initial weights; then biases and
    LayerNorm gains are drawn away from 0 and 1 in both models;
  - the chained pieces' loss and every joined parameter gradient match GPT's (rtol 1e-10),
    with dropout off and on, and the activations between pieces are (B, T, C), or
    (B, T/tp, C) under SP; the head's gathered logits match GPT's;
  - 3 AdamW steps, each rank updating only its shards, track single-process training;
  - the communicator counters show exactly the traffic Megatron-LM and Korthikanti et al.
    describe, piece by piece, forward and backward;
  - bad layouts raise the same ConfigError on every rank.
On 4 ranks the checks also run in the two tp groups of a dp 2 x tp 2 grid.
"""
import pytest

from minipar.errors import ConfigError
from minipar.nn.gpt import GPTConfig
from minipar.parallel.tensor_parallel import validate_tensor_parallel
from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_tensor_parallel_matches_single_process(nranks):
    results = results_from_ranks(nranks, "tests.mpi_bodies.tensor_parallel_body:run_all_checks", timeout=120)
    checks = ["equivalence sp=False", "dropout sp=False", "equivalence sp=True", "dropout sp=True", "loss with padding",
              "bad input"]
    if nranks == 4:  # the two tp groups of a dp 2 x tp 2 grid as well
        checks.append("equivalence in the tp groups of dp 2 x tp 2")
    assert_as_expected(results, checks=checks)


def test_config_errors_name_the_numbers():
    good = GPTConfig(vocab_size=16, n_head=4, n_embd=16)
    validate_tensor_parallel(good, 4, 8)  # divides everything: no error
    with pytest.raises(ConfigError, match=r"n_head \(4\) must be divisible by tp \(8\)"):
        validate_tensor_parallel(good, 8, 8)
    with pytest.raises(ConfigError, match=r"vocab_size \(65\) must be divisible by tp \(2\)"):
        validate_tensor_parallel(GPTConfig(vocab_size=65, n_head=4, n_embd=16), 2, 2)
    # 4 * n_embd only fails together with n_head (n_head divides n_embd); every problem is listed.
    with pytest.raises(ConfigError, match=r"n_head \(2\).*tp \(16\).*4 \* n_embd \(8\) must be divisible by tp "
                                          r"\(16\).*vocab_size \(15\)"):
        validate_tensor_parallel(GPTConfig(vocab_size=15, n_head=2, n_embd=2), 16, 16)
    with pytest.raises(ConfigError, match=r"tp \(4\) must divide the number of MPI ranks \(6\)"):
        validate_tensor_parallel(good, 4, 6)
    for bad_tp in (0, -2, 2.0, True):
        with pytest.raises(ConfigError, match="tp must be a positive integer"):
            validate_tensor_parallel(good, bad_tp, 8)
