"""Mixed precision (--precision bf16|fp16, minipar/mixed_precision.py): 16-bit compute on fp32 masters.

What is checked: the flag is validated up front and named in errors; under 16-bit compute every
op's output and every gradient is a number of the format, and the loss is not rounded (an fp32
island); the masters are fp32 and the working copies are their rounding; checkpoints carry the
masters; the memory report gives (2 + 2 + 12)Ψ, and ZeRO's Figure 1 on 8 ranks, equal to the
planner's mixed-precision figures; an overflow on one rank makes every rank skip; each layout
stays within the derived bound of its own float64 run for 20 steps, and equals one process in
the same precision where the reduction order is the same (docs/mixed_precision.md).
"""
import numpy as np
import pytest

from minipar import ops
from minipar.backend import set_default_dtype
from minipar.comm import Communicator
from minipar.errors import ConfigError
from minipar.mixed_precision import rounding
from minipar.nn.gpt import GPT, GPTConfig
from minipar.precision import round_to_format
from minipar.run import flags_in_messages
from minipar.tensor import Tensor, rounding_to
from minipar.testing import results_from_ranks
from minipar.train import TrainConfig, Trainer
from tests.mpi_bodies.mixed_precision_body import adam_drift_bound, adam_step_bound, batches

TINY = dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)
BODY = "tests.mpi_bodies.mixed_precision_body"


@pytest.fixture(autouse=True)
def float32_default():
    set_default_dtype(np.float32)


def is_format(array, precision):
    array = np.asarray(array, dtype=np.float32)
    return bool(np.array_equal(round_to_format(array, precision), array))


@pytest.mark.parametrize("options, message", [
    (dict(precision="fp8"), "--precision must be one of fp32, bf16, fp16, got 'fp8'"),
    (dict(precision="bf16", dtype="float64"), "--precision bf16 keeps fp32 master weights"),
    (dict(precision="fp16", compress="bf16"), "--precision fp16 with compress"),
    (dict(precision="bf16", local_sgd=4, dp=2), "--precision bf16 with --local-sgd"),
])
def test_bad_precision_options_are_refused_naming_the_flag(options, message):
    with pytest.raises(ConfigError) as error, flags_in_messages():
        TrainConfig(**options)
    assert message in str(error.value)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_op_output_and_gradient_is_16_bit_and_the_loss_is_not(precision):
    rng = np.random.default_rng(0)
    x = Tensor(round_to_format(rng.standard_normal((4, 8)), precision), requires_grad=True)
    w, gain, bias = (Tensor(round_to_format(rng.standard_normal(shape), precision), requires_grad=True)
                     for shape in ((8, 8), (8,), (8,)))
    with rounding_to(rounding(precision)):
        hidden = ops.linear(x, w, bias)
        normed = ops.layer_norm(hidden, gain, bias)
        probabilities = ops.softmax(normed * 3.7)
        loss = ops.cross_entropy(normed + probabilities, Tensor(np.array([1, 2, 3, 4])))
        loss.backward()
    for name, tensor in (("linear", hidden), ("layer norm", normed), ("softmax", probabilities)):
        assert is_format(tensor.data, precision), f"{name}'s output is not a {precision} number"
    for name, tensor in (("x", x), ("w", w), ("gain", gain), ("bias", bias)):
        assert is_format(tensor.grad, precision), f"the gradient of {name} is not a {precision} number"
    assert not is_format(loss.data, precision), f"the loss {float(loss.data)!r} was rounded to {precision}"
    with rounding_to(rounding(precision)):  # the whole model: every parameter's gradient 16-bit
        model = GPT(GPTConfig(**TINY))
        for p in model.parameters():
            p.data[...] = round_to_format(p.data, precision)
        ids = rng.integers(0, 16, (4, 9))
        model(Tensor(ids[:, :-1]), Tensor(ids[:, 1:]))[1].backward()
    assert all(is_format(p.grad, precision) for p in model.parameters()), "a parameter's gradient is not 16-bit"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_masters_are_fp32_and_the_working_copies_their_rounding(precision):
    config = TrainConfig(steps=4, batch_size=8, warmup_steps=1, learning_rate=1e-2, precision=precision)
    trainer = Trainer(GPTConfig(**TINY), config, Communicator())
    for inputs, targets in batches(8, trainer.model_config, 4):
        trainer.train_step(inputs, targets)
    masters = trainer.precision.masters
    assert all(m.dtype == np.float32 for m in masters)
    for t, master in zip(trainer.sync.updated, masters, strict=True):
        np.testing.assert_array_equal(t.data, round_to_format(master, precision), err_msg=t.shard.full_name)
    assert not all(is_format(m, precision) for m in masters), "the masters hold only 16-bit numbers: not updated in fp32"
    saved = trainer.parameter_arrays()  # a checkpoint carries the masters, not their rounding
    for name, p in trainer.named_parameters:
        np.testing.assert_array_equal(saved[name], masters[[id(t) for t in trainer.sync.updated].index(id(p))])
    fresh = Trainer(GPTConfig(**TINY), config, Communicator())
    fresh.load_parameter_arrays(saved)
    for t, master in zip(fresh.sync.updated, fresh.precision.masters, strict=True):
        np.testing.assert_array_equal(master, saved[t.shard.full_name])
        np.testing.assert_array_equal(t.data, round_to_format(master, precision))


def test_memory_report_is_2_2_12_bytes_per_parameter():
    config = TrainConfig(steps=2, batch_size=8, warmup_steps=1, precision="bf16")
    trainer = Trainer(GPTConfig(**TINY), config, Communicator())
    for inputs, targets in batches(8, trainer.model_config, 1):
        trainer.train_step(inputs, targets)
    psi = trainer.num_parameters()
    report = trainer.memory_report()
    got = {key: report[key] for key in ("parameters", "gradients", "optimizer_states", "master_weights", "total")}
    assert got == {"parameters": 2 * psi, "gradients": 2 * psi, "optimizer_states": 12 * psi,
                   "master_weights": 4 * psi, "total": 16 * psi}
    assert report["storage_bytes"] == 20 * psi  # what NumPy holds: 16-bit numbers in float32 arrays


def test_adam_step_bound_is_one_at_the_first_step_and_grows_to_its_limit():
    betas = (0.9, 0.99)
    ratio = betas[0] ** 2 / betas[1]
    assert adam_step_bound(1, betas) == pytest.approx(1.0)
    limit = (1 - betas[0]) / np.sqrt(1 - betas[1]) / np.sqrt(1 - ratio)
    assert adam_step_bound(10_000, betas) == pytest.approx(limit)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_process_in_16_bit_stays_within_the_bound_of_float64(precision):
    """The quick case of the layouts' test below: one process, 20 steps, the tiny model."""
    model_config = GPTConfig(**TINY)
    runs = {}
    for name, options in (("16", dict(precision=precision)), ("64", dict(dtype="float64"))):
        config = TrainConfig(steps=20, batch_size=8, warmup_steps=2, learning_rate=1e-2, **options)
        trainer = Trainer(model_config, config, Communicator())
        start = trainer.gather_state()
        for inputs, targets in batches(8, model_config, 20):
            trainer.train_step(inputs, targets)
        runs[name] = start, trainer.gather_state()
    initial = max(np.max(np.abs(runs["16"][0][k] - runs["64"][0][k])) for k in runs["64"][0])
    difference = max(np.max(np.abs(runs["16"][1][k] - runs["64"][1][k])) for k in runs["64"][1])
    bound = initial + adam_drift_bound(config, 20)
    assert 0 < difference <= bound, f"largest |θ16 - θ64| = {difference:.3g}, bound {bound:.3g}"


def test_an_overflow_on_one_rank_makes_every_rank_skip():
    """fp16, tp = 2: rank 1 alone finds an inf at step 1; both ranks skip it (parameters unchanged, scale
    halved) and step 2 updates again."""
    results = results_from_ranks(2, f"{BODY}:overflow_on_one_rank", layout=dict(tp=2), overflow_rank=1)
    for rank, (first, second, third) in enumerate(results):
        assert (second["changed"], second["skipped"], second["scale"]) == \
            (False, first["skipped"] + 1, first["scale"] / 2), f"rank {rank} did not skip step 1: {second}"
        assert third["changed"] and third["skipped"] == second["skipped"], f"rank {rank}: step 2 {third}"
    assert results[0] == results[1], f"the ranks disagree: {results}"


# Layouts, 20 steps each in 16 bits and in float64. ``equal``: the reduction order is the one
# process's (docs/mixed_precision.md), so the 16-bit run equals one process bit for bit.
LAYOUTS = {
    2: [(dict(dp=2), 2, True), (dict(dp=2, zero=1), 2, True), (dict(dp=2, zero=2), 2, True),
        (dict(dp=2, zero=3), 2, True), (dict(tp=2), 1, False), (dict(pp=2, microbatches=4), 4, False),
        (dict(tp=2, sequence_parallel=True), 1, False)],
    8: [(dict(dp=2, tp=2, pp=2, microbatches=2, zero=1), 4, False)],
}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("nranks", sorted(LAYOUTS))
def test_layouts_in_16_bit_within_the_bound_of_float64_and_equal_one_process(nranks, precision):
    cases = [dict(layout, precision=precision, reference_microbatches=m) for layout, m, _ in LAYOUTS[nranks]]
    reported = results_from_ranks(nranks, f"{BODY}:against_references", cases=cases, steps=20, timeout=1800)[0]
    for (layout, _, equal), case in zip(LAYOUTS[nranks], reported, strict=True):
        assert case["difference"] <= case["bound"], f"{layout} {precision}: |θ16 - θ64| = {case['difference']:.3g} " \
                                                    f"beyond the bound {case['bound']:.3g}"
        if equal and precision == "bf16":
            assert case["equals_one_process"] and case["losses_equal_one_process"], \
                f"{layout} bf16 differs from one process by {case['difference_from_one_process']:.3g}"


@pytest.mark.slow
def test_zero_memory_on_8_ranks_is_the_papers_figure_1_and_the_planners():
    rows = results_from_ranks(8, f"{BODY}:memory_against_formulas", timeout=1800)
    for rank, rank_rows in enumerate(rows):
        for row in rank_rows:
            stage, psi = row["stage"], row["psi"]
            assert row["held"] == row["formula"], f"rank {rank} ZeRO-{stage}: {row['measured']} != {row['formula']}"
            assert row["measured"] == row["planner"], f"rank {rank} ZeRO-{stage}: planner {row['planner']}"
            assert row["held"] == row["planner_total"], f"rank {rank} ZeRO-{stage}"
            assert row["master_weights"] == 4 * psi // (1 if stage == 0 else 8), f"rank {rank} ZeRO-{stage}"


def test_a_checkpoint_resumes_the_masters_moments_and_loss_scale(tmp_path):
    from minipar.parallel.distributed_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint

    config = TrainConfig(steps=6, batch_size=8, warmup_steps=1, learning_rate=1e-2, precision="fp16")
    data = batches(8, GPTConfig(**TINY), 6)
    straight = Trainer(GPTConfig(**TINY), config, Communicator())
    for step, (inputs, targets) in enumerate(data):
        straight.train_step(inputs, targets)
        if step == 2:
            save_distributed_checkpoint(tmp_path / "ckpt.minipar", straight)
            saved_scale = straight.precision.scale
    resumed = Trainer(GPTConfig(**TINY), config, Communicator())
    load_distributed_checkpoint(tmp_path / "ckpt.minipar", resumed)
    assert resumed.precision.scale == saved_scale
    for inputs, targets in data[3:]:
        resumed.train_step(inputs, targets)
    assert resumed.precision.scale == straight.precision.scale
    for a, b in zip(resumed.precision.masters, straight.precision.masters, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_split_backward_equals_plain_backward_in_16_bit(precision):
    """Zero-bubble schedules split backward into B and W (tensor.WeightGradients): in 16 bits too, W's
    gradients must be rounded and summed as a plain backward's are, bit for bit."""
    rng = np.random.default_rng(1)
    arrays = [round_to_format(rng.standard_normal(shape), precision) for shape in ((4, 8), (8, 8), (8, 8), (8,))]
    grads = []
    for split in (False, True):
        x, w1, w2, b = (Tensor(a.copy(), requires_grad=True) for a in arrays)
        with rounding_to(rounding(precision)):
            out = ops.linear(ops.linear(x, w1, b).tanh(), w2, b) * 0.37
            later = out.backward(np.ones((4, 8), dtype=np.float32), defer_weights=split, inputs=(x,))
            if split:
                later.run()
        grads.append([t.grad for t in (x, w1, w2, b)])
    for name, plain, split in zip(("x", "w1", "w2", "b"), *grads, strict=True):
        assert is_format(split, precision), f"{name}: the split backward's gradient is not a {precision} number"
        np.testing.assert_array_equal(split, plain, err_msg=name)
