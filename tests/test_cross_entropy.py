"""Cross-entropy by log-sum-exp: finite for confident wrong predictions, padded targets ignored,
gradients checked by central differences."""
import numpy as np
import pytest

from minipar import ops
from minipar.errors import ShapeError
from minipar.gradcheck import check_gradients
from minipar.tensor import Tensor


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_confident_wrong_prediction_costs_the_logit_gap_not_infinity():
    # The target logit is 104 below the maximum: log(softmax) underflows to log(0) in float32.
    logits = np.array([[104.0, 0.0, 0.0]], dtype=np.float32)
    loss = ops.cross_entropy(Tensor(logits), np.array([1])).item()
    expected = 104.0 + np.log1p(2 * np.exp(-104.0))  # logsumexp(z) - z[1], exactly 104 in float32
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_cross_entropy_gradient_with_ignored_targets():
    targets = np.array([[0, -100, 3], [-100, 1, 0]])
    check_gradients(lambda z: ops.cross_entropy(z, targets, ignore_index=-100), [randn(2, 3, 5) * 2])


def test_ignored_targets_leave_the_mean_of_the_others():
    logits, targets = randn(6, 5, seed=1), np.array([1, 4, -1, 0, -1, 2])
    kept = targets != -1
    expected = ops.cross_entropy(Tensor(logits[kept]), targets[kept]).item()
    got = ops.cross_entropy(Tensor(logits), targets, ignore_index=-1).item()
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    z = Tensor(logits, requires_grad=True)
    ops.cross_entropy(z, targets, ignore_index=-1).backward()
    np.testing.assert_array_equal(z.grad[~kept], 0.0)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    z = Tensor(randn(3, 4), requires_grad=True)
    loss = ops.cross_entropy(z, np.full(3, -1), ignore_index=-1)
    loss.backward()
    assert loss.item() == 0.0 and not z.grad.any()


def test_targets_out_of_range_are_refused_unless_ignored():
    with pytest.raises(ShapeError, match=r"targets must lie in \[0, 4\)"):
        ops.cross_entropy(Tensor(randn(2, 4)), np.array([0, -1]))
    with pytest.raises(ShapeError, match="or equal ignore_index -1"):
        ops.cross_entropy(Tensor(randn(2, 4)), np.array([4, -1]), ignore_index=-1)
