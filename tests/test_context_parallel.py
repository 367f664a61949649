"""Context parallelism (ring attention, zigzag, the all-gather variant) equals one process.

On 1, 2, 4 and 8 ranks (one mpiexec launch each, tests/mpi_bodies/context_parallel_body.py), in
float64, for both layouts (contiguous, zigzag) and three attention variants (ring, ring with
overlap, all-gather):
  - attention alone: output and dQ, dK, dV equal the single-process causal attention's slices;
  - a GPT whose attention is swapped for the cp module, each rank holding its tokens at their
    positions: the mean loss over cp, the gathered logits and every parameter gradient averaged
    over cp equal one process;
  - bytes each rank sent, from the communicator's counters: ring 2(N-1) K/V blocks forward and
    4(N-1) backward, all-gather 2(N-1) each way;
  - the causal work per rank: contiguous max/mean = (2N-1)/N, zigzag every rank the same;
  - with data parallelism (dp x cp), with tensor parallelism's pieces (dp x cp x tp, with and
    without sequence parallelism) and with a pipeline (pp x dp x cp): gradients averaged over
    dp x cp equal one process's.
In this process: the log-sum-exp merge, and ring and all-gather attention on one rank (zigzag:
full, diagonal and skipped block pairs), against central differences; layouts and refusals.
"""
import numpy as np
import pytest

from minipar.backend import BACKEND_NAME
from minipar.errors import ConfigError
from minipar.gradcheck import check_gradients
from minipar.parallel.context_parallel import MergePartials, check_layout, chunks_of_rank, token_positions
from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected

BODY = "tests.mpi_bodies.context_parallel_body:run_checks"
LENGTH = 32  # tests/mpi_bodies/context_parallel_body.ATTENTION_SHAPE's T
CASE_NAMES = [f"{part} {layout} {variant}" for layout in ("contiguous", "zigzag")
              for variant in ("ring", "ring overlap", "allgather") for part in ("attention", "GPT")]


def assert_work_balance(results, nranks, cases):
    """Per-rank causal work (score entries per sequence and head, a diagonal block half) as the formulas say."""
    for case in cases:
        work = [report["work"][case] for report in results]
        assert sum(work) == LENGTH * LENGTH / 2, f"{case}: the ranks' work {work} must add up to T^2/2"
        ratio = max(work) / (sum(work) / nranks)
        if case.startswith("contiguous"):
            expected = [(r + 0.5) * (LENGTH / nranks) ** 2 for r in range(nranks)]  # r full blocks + half a diagonal
            assert work == expected, f"{case}: contiguous work per rank {work}, expected {expected}"
            assert ratio == pytest.approx((2 * nranks - 1) / nranks, rel=1e-15), f"{case}: max/mean {ratio}"
        else:
            assert ratio == 1.0, f"{case}: zigzag work per rank {work} is not balanced"


def run_and_check(nranks, cases=None):
    results = results_from_ranks(nranks, BODY, timeout=300, cases=cases)
    names = CASE_NAMES if cases is None else [
        f"{part} {layout} {variant}{' overlap' if overlap else ''}" for layout, variant, overlap in cases
        for part in ("attention", "GPT")]
    assert_as_expected(results, checks=names)
    assert_work_balance(results, nranks, results[0]["work"])


@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_context_parallel_matches_single_process(nranks):
    run_and_check(nranks)


@pytest.mark.slow
def test_context_parallel_matches_single_process_8_ranks():
    run_and_check(8)


def test_context_parallel_8_ranks_quick():
    run_and_check(8, cases=[["zigzag", "ring", True], ["contiguous", "allgather", False]])


def test_merge_rule_gradient():
    generator = np.random.default_rng(0)
    shape = (2, 3, 4)
    out1, out2 = generator.standard_normal((2, *shape, 5))
    lse1, lse2 = generator.standard_normal((2, *shape)) * 3
    check_gradients(lambda a, b, c, d: MergePartials.apply(a, b, c, d), [out1, lse1, out2, lse2])


def test_merge_rule_equals_softmax_over_the_union():
    from minipar.ops.fused import attention_forward
    from minipar.parallel.context_parallel import merge_partials

    generator = np.random.default_rng(1)
    q, k, v = generator.standard_normal((3, 2, 6, 4))
    whole, _, whole_lse = attention_forward(q, k, v)
    out, _, lse = attention_forward(q, k[:, :2], v[:, :2])
    partial, _, partial_lse = attention_forward(q, k[:, 2:], v[:, 2:])
    merge_partials(out, lse, partial, partial_lse)
    np.testing.assert_allclose(out, whole, rtol=1e-13)
    np.testing.assert_allclose(lse, whole_lse, rtol=1e-13)


@pytest.mark.parametrize("variant", ["ring", "allgather"])
def test_one_rank_attention_gradient(variant):
    """On one rank (MPI.COMM_SELF) the zigzag layout still cuts the sequence into 2 chunks: the
    pairs (0,0) and (1,1) are diagonal, (1,0) full, (0,1) skipped, and merged by log-sum-exp."""
    from mpi4py import MPI

    from minipar.comm import Communicator
    from minipar.parallel.context_parallel_model import context_parallel_attention

    communicator = Communicator(MPI.COMM_SELF)
    arrays = list(np.random.default_rng(2).standard_normal((3, 1, 2, 6, 3)))
    order = token_positions(0, 1, 6, "zigzag")
    np.testing.assert_array_equal(order, np.arange(6))
    check_gradients(lambda q, k, v: context_parallel_attention(q, k, v, communicator, "zigzag", variant), arrays)


def test_layouts():
    assert [chunks_of_rank(r, 4, "zigzag") for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert [chunks_of_rank(r, 4, "contiguous") for r in range(4)] == [(0,), (1,), (2,), (3,)]
    assert token_positions(1, 2, 8, "zigzag").tolist() == [2, 3, 4, 5]
    assert token_positions(0, 2, 8, "zigzag").tolist() == [0, 1, 6, 7]
    assert token_positions(1, 2, 8, "contiguous").tolist() == [4, 5, 6, 7]
    every = np.sort(np.concatenate([token_positions(r, 4, 16, "zigzag") for r in range(4)]))
    np.testing.assert_array_equal(every, np.arange(16))


def test_layout_refusals_say_why():
    with pytest.raises(ConfigError, match=r"sequence length 12 does not split into the 8 equal chunks that cp 4 "
                                          r"with the zigzag layout needs; use a multiple of 8"):
        check_layout(12, 4, "zigzag")
    assert check_layout(12, 4, "contiguous") == 3
    with pytest.raises(ConfigError, match=r"cp layout must be one of \['contiguous', 'zigzag'\], got 'striped'"):
        check_layout(16, 2, "striped")


@pytest.mark.parametrize("nranks, dp, variant", [(4, 2, "ring"), pytest.param(4, 2, "allgather", marks=pytest.mark.slow),
                                                 pytest.param(8, 2, "ring", marks=pytest.mark.slow),
                                                 pytest.param(8, 4, "allgather", marks=pytest.mark.slow)])
def test_data_and_context_parallel(nranks, dp, variant):
    """Gradients averaged over the dp x cp group equal one process's on the whole batch."""
    results = results_from_ranks(nranks, "tests.mpi_bodies.context_parallel_body:run_data_and_context_parallel",
                                 timeout=300, dp=dp, variant=variant)
    assert_as_expected(results, checks=[f"dp {dp} x cp {nranks // dp} zigzag {variant}"])


@pytest.mark.parametrize("nranks, dp, cp, sequence_parallel, variant", [
    (4, 1, 2, True, "ring"),
    pytest.param(8, 2, 2, True, "ring", marks=pytest.mark.slow),
    pytest.param(8, 2, 2, False, "allgather", marks=pytest.mark.slow),
    pytest.param(8, 1, 4, True, "ring", marks=pytest.mark.slow)])
def test_with_tensor_parallel(nranks, dp, cp, sequence_parallel, variant):
    """dp x cp x tp with tensor parallelism's pieces (and SP): the joined tp shards of the gradients,
    averaged over dp x cp, equal one process's."""
    results = results_from_ranks(nranks, "tests.mpi_bodies.context_parallel_body:run_with_tensor_parallel",
                                 timeout=300, dp=dp, cp=cp, sequence_parallel=sequence_parallel, variant=variant)
    tp = nranks // (dp * cp)
    assert_as_expected(results, checks=[f"dp {dp} x cp {cp} x tp {tp}{' SP' if sequence_parallel else ''} "
                                        f"zigzag {variant}"])


def test_validation_refuses_in_one_sentence():
    from minipar.nn.gpt import GPTConfig
    from minipar.parallel.context_parallel_model import validate_context_parallel

    config = GPTConfig(vocab_size=16, block_size=12, n_head=2, n_embd=8)
    validate_context_parallel(config, 2, "zigzag", "ring", 8)  # 12 tokens in 4 chunks of 3
    with pytest.raises(ConfigError, match=r"sequence length 12 does not split into the 8 equal chunks that cp 4 "
                                          r"with the zigzag layout needs; use a multiple of 8"):
        validate_context_parallel(config, 4, "zigzag", "ring", 8)
    with pytest.raises(ConfigError, match=r"cp \(3\) must divide the number of MPI ranks \(8\)"):
        validate_context_parallel(config, 3, "contiguous", "ring", 8)
    with pytest.raises(ConfigError, match=r"cp attention must be one of \['ring', 'allgather'\], got 'p2p'"):
        validate_context_parallel(config, 2, "contiguous", "p2p", 8)
    with pytest.raises(ConfigError, match=r"sequence parallelism splits each cp rank's 6 tokens \(block_size 12 / "
                                          r"cp 2\) over tp \(4\): they must be divisible"):
        validate_context_parallel(config, 2, "contiguous", "ring", 8, tp=4, sequence_parallel=True)
    validate_context_parallel(config, 2, "contiguous", "ring", 8, tp=4)  # without SP every tp rank has all 6
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="cp must be a positive integer"):
            validate_context_parallel(config, bad, "contiguous", "ring", 8)


@pytest.mark.parametrize("nranks, pp, dp, schedule", [
    (4, 2, 1, "1f1b"),
    pytest.param(8, 2, 2, "1f1b", marks=pytest.mark.slow),
    pytest.param(8, 2, 1, "gpipe", marks=pytest.mark.slow)])
def test_with_pipeline(nranks, pp, dp, schedule):
    """pp x dp x cp: every stage's pieces on its cp ranks' tokens; gradients averaged over the
    stage's dp x cp ranks (after the tied embedding's sum) equal one process's."""
    results = results_from_ranks(nranks, "tests.mpi_bodies.context_parallel_body:run_with_pipeline", timeout=300,
                                 pp=pp, dp=dp, schedule=schedule)
    assert_as_expected(results, checks=[f"pp {pp} x dp {dp} x cp {nranks // (pp * dp)} {schedule} zigzag ring"])


@pytest.mark.devicesim
@pytest.mark.skipif(BACKEND_NAME != "devicesim", reason="run with MINIPAR_BACKEND=devicesim (MPI jobs)")
@pytest.mark.parametrize("nranks", [2, 4])
def test_on_devicesim(nranks):
    """Under devicesim (a strict stand-in for CuPy): the same equalities on device arrays, every
    message through the staged transport, no implicit host copy."""
    run_and_check(nranks, cases=[["zigzag", "ring", True], ["contiguous", "ring", False],
                                 ["zigzag", "allgather", False]])
    results = results_from_ranks(4, "tests.mpi_bodies.context_parallel_body:run_with_tensor_parallel", timeout=300,
                                 dp=1, cp=2, sequence_parallel=True)
    assert_as_expected(results, checks=["dp 1 x cp 2 x tp 2 SP zigzag ring"])


def test_addition_default_steps_grow_with_digits():
    """The done-when's 4-digit run: one process stays on the plateau through 2,000 steps, so the
    addition task's default run length grows by 1,500 steps per digit beyond 2 (run.addition_steps);
    --steps, a checkpoint's schedule and a text file keep theirs."""
    from argparse import Namespace

    from minipar.run import run_schedule

    def steps(index=None, **given):
        arguments = Namespace(**{"data": None, "digits": 2, "steps": None, "warmup": None, "lr": None,
                                 "min_lr": None, **given})
        return run_schedule(arguments, index)[0]["steps"]

    assert [steps(digits=d) for d in (1, 2, 3, 4, 9)] == [2000, 2000, 3500, 5000, 12500]
    assert steps(digits=4, steps=700) == 700
    assert steps(digits=4, data="text.txt") == 2000
    assert steps({"train_config": {"steps": 2000}}, digits=4) == 2000  # a resumed run continues its cosine
