"""CPU ranks timed per GEMM shape class: ``calibrate``'s table, the planner's use of it, the fit of the rest.

The rates are synthetic here (a timing test would measure the load of the machine, not the
code): a table where thin products run slowly must make the planner time each GEMM of a block,
forward and both backward products, by its own shape, and ``rest_fit`` must recover the per-block
overhead and per-element cost from blocks whose times were built from them.
"""
import math

import pytest

from minipar.plan import calibrate
from minipar.plan.cost import stage_compute, step_time
from minipar.plan.hardware import Machine, load_machine
from minipar.plan.kernels import THIN, WIDE, block_elements, gemm_seconds_cpu
from minipar.plan.model import ModelSpec
from minipar.plan.strategy import Strategy


def thin_is_slow(thin, wide):
    """A made-up rate: 1 GFLOP/s per row of the thin side, capped at 64 rows, and 2× for wide >= 128."""
    return 1e9 * min(thin, 64) * (2 if wide >= 128 else 1)


TABLE = [[thin, wide, thin_is_slow(thin, wide)] for thin in THIN for wide in WIDE]


def machine(table=TABLE, overhead=2e-4, per_element=3e-9):
    return Machine("here", 8, 8, 4e9, 5e9, 0, 0, 0, 0, 1e9, overhead, {}, gemm_table=table,
                   elementwise_seconds=per_element)


def test_gemm_seconds_at_the_measured_classes_and_between():
    rates = machine().gemm_rates
    for thin in THIN:
        for wide in WIDE:
            if thin <= wide:  # (thin x wide) by (wide x wide): exactly the measured class
                assert gemm_seconds_cpu(thin, wide, wide, rates) == pytest.approx(
                    2 * thin * wide * wide / thin_is_slow(thin, wide), rel=1e-12), (thin, wide)
    # the class is the sorted shape: every order of the three sizes costs the same
    times = {gemm_seconds_cpu(*shape, rates) for shape in ((8, 64, 256), (256, 8, 64), (64, 256, 8))}
    assert max(times) == pytest.approx(min(times), rel=1e-12), times
    # between two classes (thin 8 between 4 and 16, wide 128): between their seconds per FLOP
    low, high = (2 * t * 128 * 128 / thin_is_slow(t, 128) for t in (4, 16))
    middle = gemm_seconds_cpu(8, 128, 128, rates)
    assert high / 4 * 2 < middle < low * 2, (low, middle, high)  # FLOPs x2 from thin 4 to 8, /2 to 16
    # beyond the grid, the edge's rate
    assert gemm_seconds_cpu(2048, 2048, 2048, rates) == pytest.approx(2 * 2048 ** 3 / thin_is_slow(256, 512))


def block_gemms_by_hand(b, s, h, a, table):
    """A GPT block's GEMMs written out (qkv, proj, fc, fc-out; QKᵀ and P·V per head), forward and
    its two backward products each: (forward seconds, backward seconds, forward attention seconds)."""
    rates = {(thin, wide): rate for thin, wide, rate in table}
    t = b * s
    dense = [(t, h, 3 * h, 1), (t, h, h, 1), (t, h, 4 * h, 1), (t, 4 * h, h, 1)]
    attention = [(s, h // a, s, b * a), (s, s, h // a, b * a)]  # S = Q·Kᵀ, O = P·V (P is s × s)
    seconds = lambda m, k, n, batch: gemm_seconds_cpu(m, k, n, rates, batch)  # noqa: E731
    forward = sum(seconds(*g) for g in dense + attention)
    backward = sum(seconds(m, n, k, batch) + seconds(k, m, n, batch) for m, k, n, batch in dense + attention)
    return forward, backward, sum(seconds(*g) for g in attention)


@pytest.mark.parametrize("recompute", ["", "full", "selective"])
def test_planner_times_each_gemm_of_a_cpu_block_by_its_shape(recompute):
    model = ModelSpec(2, 64, 4, 32, 64)
    strategy = Strategy(2, 1, 2, 8, 2, recompute=recompute)  # micro-batch 2, one block per stage
    calibrated = machine()
    forward, backward, attention = block_gemms_by_hand(2, 32, 64, 4, TABLE)
    rest = calibrated.overhead_per_block + calibrated.elementwise_seconds * 2 * 32 * (64 + 256 + 32 * 4)
    got = stage_compute(model, strategy, calibrated, 1)  # stage 1: block 1 and the head
    head_shape = (64, 64, 64)  # T x h by h x V
    head_forward = gemm_seconds_cpu(*head_shape, calibrated.gemm_rates) + calibrated.elementwise_seconds * 64 * 64 / 3
    assert got["forward"] == pytest.approx(forward + rest / 3 + head_forward, rel=1e-12)
    head_backward = (gemm_seconds_cpu(64, 64, 64, calibrated.gemm_rates) * 2
                     + 2 * calibrated.elementwise_seconds * 64 * 64 / 3)
    assert got["backward"] == pytest.approx(backward + 2 * rest / 3 + head_backward, rel=1e-12)
    expected_recompute = {"": 0.0, "full": got["forward"], "selective": attention}[recompute]
    assert got["recompute"] == pytest.approx(expected_recompute, rel=1e-12)


def test_thin_micro_batches_cost_more_per_flop_than_one_rate_says():
    """With thin products slow, splitting a batch into micro-batches of one row costs more than
    the one-rate model (no table) says, where every FLOP costs the same."""
    model = ModelSpec(4, 64, 4, 16, 64)
    per_shape, one_rate = machine(), machine(table=[])
    one_row, whole = Strategy(1, 1, 1, 16, 16), Strategy(1, 1, 1, 16, 1)
    ratio = lambda m: step_time(model, one_row, m)["compute"] / step_time(model, whole, m)["compute"]  # noqa: E731
    assert ratio(per_shape) > 1.5 * ratio(one_rate), (ratio(per_shape), ratio(one_rate))


def test_rest_fit_recovers_the_overhead_and_the_per_element_cost():
    overhead, per_element = 1.5e-3, 4e-9
    gemms_only = machine(overhead=0.0, per_element=0.0)
    points = []
    for width, batch, length in calibrate.BLOCK_POINTS:
        model, strategy = ModelSpec(1, width, 4, length, 8), Strategy(1, 1, 1, batch)
        forward, backward, _ = block_gemms_by_hand(batch, length, width, 4, TABLE)
        assert block_elements(model, strategy) == batch * length * (width + 4 * width + length * 4)
        seconds = forward + backward + overhead + per_element * block_elements(model, strategy)
        points.append((width, batch, length, 0.0, seconds))
    assert calibrate.rest_fit(points, TABLE) == pytest.approx((overhead, per_element), rel=1e-9)
    assert gemms_only.gemm_rates  # the table alone times the GEMMs


def test_calibrate_measures_every_shape_class_and_the_file_keeps_them(tmp_path):
    from minipar.comm import Communicator

    table = calibrate.gemm_table("float64", 1, Communicator(), work=100_000)  # a quick, coarse table
    assert [(thin, wide) for thin, wide, _ in table] == [(t, w) for t in THIN for w in WIDE]
    assert all(math.isfinite(rate) and rate > 0 for *_, rate in table), table
    path = tmp_path / "calibration.json"
    path.write_text(machine(table=table).to_json())
    loaded = load_machine(str(path))
    assert loaded.gemm_rates == machine(table=table).gemm_rates
    assert loaded.elementwise_seconds == 3e-9
