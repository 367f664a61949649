"""Optimizers against their formulas, clipping, and the learning-rate schedule."""
import math

import numpy as np
import pytest

from minipar.errors import ConfigError
from minipar.nn.module import Parameter
from minipar.optim import SGD, AdamW, clip_grad_norm, cosine_learning_rate, decay_groups


def parameter(values, grad):
    p = Parameter(np.array(values, dtype=np.float64))
    p.grad = np.array(grad, dtype=np.float64)
    return p


def test_sgd_step():
    p = parameter([1.0, 2.0], [0.5, -1.0])
    SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [0.95, 2.1])


def test_sgd_momentum_two_steps():
    p = parameter([1.0], [1.0])
    optimizer = SGD([p], lr=0.1, momentum=0.9)
    optimizer.step()  # u = 1, theta = 0.9
    optimizer.step()  # u = 0.9 + 1 = 1.9, theta = 0.9 - 0.19
    np.testing.assert_allclose(p.data, [0.71])


def test_adamw_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(3)]
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.95, 1e-8, 0.1
    p = parameter(theta.copy(), grads[0])
    optimizer = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m = v = np.zeros(5)
    for t, g in enumerate(grads, start=1):
        p.grad = g
        optimizer.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * wd * theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(p.data, theta, rtol=1e-12)


def test_decay_groups_skip_vectors():
    named = [("w", parameter(np.ones((2, 2)), np.ones((2, 2)))), ("b", parameter([1.0], [1.0]))]
    groups = decay_groups(named, 0.5)
    assert groups[0]["weight_decay"] == 0.5 and groups[0]["params"][0] is named[0][1]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["params"][0] is named[1][1]


def test_clip_grad_norm_scales_to_max_norm():
    a, b = parameter([0.0], [3.0]), parameter([0.0], [4.0])
    norm = clip_grad_norm([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose([a.grad[0], b.grad[0]], [0.6, 0.8], rtol=1e-6)
    small = parameter([0.0], [0.1])
    clip_grad_norm([small], max_norm=1.0)
    np.testing.assert_allclose(small.grad, [0.1])


def test_cosine_schedule_shape():
    lrs = [cosine_learning_rate(s, 1.0, warmup_steps=10, total_steps=110, min_lr=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ConfigError, match="momentum"):
        SGD([], lr=0.1, momentum=1.5)
    with pytest.raises(ConfigError, match="betas"):
        AdamW([], betas=(0.9, 1.0))
