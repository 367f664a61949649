"""Number formats and dynamic loss scaling (minipar/precision.py).

The loss scaler must take PyTorch GradScaler's decisions step for step. The sequences below were
recorded once from torch 2.13.0 (CPU build), ``torch.amp.GradScaler("cpu", growth_interval=...)``,
planting inf or NaN in the gradient after ``scaler.scale(loss).backward()`` and reading
``scaler.get_scale()`` and whether ``scaler.step`` changed the parameter. PyTorch is not a dependency.
"""
import numpy as np
import pytest

from minipar.errors import ConfigError
from minipar.precision import BIT_LAYOUTS, DynamicLossScaler, round_to_format
from minipar.testing import results_from_ranks

RECORDED_PATTERN = ['ok', 'ok', 'ok', 'ok', 'ok', 'inf', 'ok', 'ok', 'ok', 'nan', 'inf', 'ok', 'ok', 'ok', 'ok',
                    'ok', 'ok', 'ok', 'inf', 'ok', 'ok', 'ok', 'ok']
# (scale after update, step skipped) per step, GradScaler("cpu", growth_interval=3)
RECORDED_DECISIONS = [(65536.0, False), (65536.0, False), (131072.0, False), (131072.0, False), (131072.0, False),
                      (65536.0, True), (65536.0, False), (65536.0, False), (131072.0, False), (65536.0, True),
                      (32768.0, True), (32768.0, False), (32768.0, False), (65536.0, False), (65536.0, False),
                      (65536.0, False), (131072.0, False), (131072.0, False), (65536.0, True), (65536.0, False),
                      (65536.0, False), (131072.0, False), (131072.0, False)]
# The defaults (growth_interval 2000): runs of (kind, count), and the steps where anything changed.
RECORDED_DEFAULT_RUNS = [('inf', 3), ('ok', 2000), ('inf', 1), ('ok', 4001)]
RECORDED_DEFAULT_CHANGES = [(0, 32768.0, True), (1, 16384.0, True), (2, 8192.0, True), (2002, 16384.0, False),
                            (2003, 8192.0, True), (4003, 16384.0, False), (6003, 32768.0, False),
                            (6004, 32768.0, False)]
# GradScaler("cpu", init_scale=2**126, growth_interval=1), three clean steps: a doubling to inf is not made.
RECORDED_CAP = [1.7014118346046923e+38, 1.7014118346046923e+38, 1.7014118346046923e+38]


def _replay(pattern, **options):
    scaler = DynamicLossScaler(**options)
    decisions = []
    for kind in pattern:
        gradient = np.full(3, float(scaler.scale), dtype=np.float32)
        if kind != "ok":
            gradient[1] = np.inf if kind == "inf" else np.nan
        stepped = scaler.unscale_and_check([gradient])
        scaler.update()
        decisions.append((float(scaler.scale), not stepped))
    return decisions


def test_loss_scaler_takes_gradscalers_decisions_step_by_step():
    got = _replay(RECORDED_PATTERN, growth_interval=3)
    for step, (expected, actual) in enumerate(zip(RECORDED_DECISIONS, got)):
        assert actual == expected, f"step {step} ({RECORDED_PATTERN[step]}): GradScaler gave (scale, skipped) = " \
                                   f"{expected}, minipar {actual}"


def test_loss_scaler_defaults_match_gradscaler_over_6004_steps():
    pattern = [kind for kind, count in RECORDED_DEFAULT_RUNS for _ in range(count)]
    got = _replay(pattern)
    changes = [(i, scale, skipped) for i, (scale, skipped) in enumerate(got)
               if skipped or i == 0 or scale != got[i - 1][0] or i == len(got) - 1]
    assert changes == RECORDED_DEFAULT_CHANGES


def test_loss_scale_never_doubles_to_infinity():
    scaler = DynamicLossScaler(init_scale=2.0**126, growth_interval=1)
    scales = []
    for _ in range(3):
        scaler.unscale_and_check([np.ones(2, dtype=np.float32)])
        scaler.update()
        scales.append(float(scaler.scale))
    assert scales == RECORDED_CAP


def test_unscale_divides_by_the_scale_in_place():
    scaler = DynamicLossScaler(init_scale=1024.0)
    gradient = np.array([1024.0, -2048.0, 3.0], dtype=np.float32)
    assert scaler.unscale_and_check([gradient]) is True
    np.testing.assert_array_equal(gradient, np.array([1.0, -2.0, 3.0 / 1024], dtype=np.float32))


def test_bad_scaler_options_are_refused():
    with pytest.raises(ConfigError, match="growth_factor > 1"):
        DynamicLossScaler(growth_factor=1.0)


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_every_rank_takes_the_same_skip_decision(nranks):
    # step 0 clean; step 1 the last rank overflows; step 2 clean; step 3 rank 0 overflows.
    overflow_on = [-1, nranks - 1, -1, 0]
    results = results_from_ranks(nranks, "tests.mpi_bodies.precision_body:agreed_skips", overflow_on=overflow_on)
    expected = [[True, 65536.0], [False, 32768.0], [True, 32768.0], [False, 16384.0]]
    for rank, result in enumerate(results):
        assert result["decisions"] == expected, f"rank {rank}: expected {expected}, got {result['decisions']}"
        assert result["allreduces"] == 4, f"rank {rank}: one allreduce per step expected, got {result['allreduces']}"


def test_bit_layouts_and_rounding_agree_with_the_formats():
    assert BIT_LAYOUTS == {"fp32": (8, 23), "bf16": (8, 7), "fp16": (5, 10)}
    for precision, (_, mantissa) in BIT_LAYOUTS.items():
        one_plus_eps = 1.0 + 2.0**-mantissa
        assert float(round_to_format(np.array([one_plus_eps]), precision)[0]) == one_plus_eps, precision
        # half an ulp above one rounds to even (back to one)
        assert float(round_to_format(np.array([1.0 + 2.0**-(mantissa + 1)]), precision)[0]) == 1.0, precision
    assert np.isinf(round_to_format(np.array([70000.0]), "fp16")[0])
    assert float(round_to_format(np.array([70000.0]), "bf16")[0]) == 70144.0  # 8 significant bits
    assert float(round_to_format(np.array([1e-8]), "fp16")[0]) == 0.0  # below fp16's smallest subnormal
    assert float(round_to_format(np.array([1e-8]), "bf16")[0]) > 0.0  # bf16 keeps fp32's range
