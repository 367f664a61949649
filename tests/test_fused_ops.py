"""The fused, cache-blocked ops (ops/activation.py, ops/fused.py, ops/blocks.py): gradients against
central differences, and values against the unfused versions their docstrings give, with blocks
small enough that every array spans several of them (float64)."""
import math

import numpy as np
import pytest

from minipar import ops
from minipar.errors import ShapeError
from minipar.gradcheck import check_gradients
from minipar.ops import blocks
from minipar.tensor import Tensor

rng = np.random.default_rng(28)


@pytest.fixture(params=[7, None], ids=["blocks of 7 numbers", "default blocks"])
def block_elements(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", request.param)
    return blocks.BLOCK_ELEMENTS


def test_row_blocks_cover_every_row_once(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 10)
    assert blocks.row_blocks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert blocks.row_blocks(2, 50) == [slice(0, 1), slice(1, 2)]  # a row wider than a block is one block
    assert blocks.row_blocks(0, 4) == []


def unfused_gelu(x):
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1 + np.tanh(u))


def unfused_gelu_derivative(x):
    t = np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x**2)


def test_gelu_gradient(block_elements):
    check_gradients(ops.gelu, [rng.standard_normal((3, 4, 5)) * 2])


def test_bias_gelu_gradient(block_elements):
    check_gradients(ops.bias_gelu, [rng.standard_normal((3, 4, 5)) * 2, rng.standard_normal(5)])


def test_gelu_and_bias_gelu_equal_the_unfused_maths(block_elements):
    x, b, g = rng.standard_normal((4, 6, 9)), rng.standard_normal(9), rng.standard_normal((4, 6, 9))
    kept = x.copy()
    inputs = Tensor(x, requires_grad=True), Tensor(x, requires_grad=True), Tensor(b, requires_grad=True)
    ops.gelu(inputs[0]).backward(g)
    out = ops.bias_gelu(inputs[1], inputs[2])
    out.backward(g)
    np.testing.assert_allclose(out.data, unfused_gelu(x + b), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(inputs[0].grad, g * unfused_gelu_derivative(x), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(inputs[1].grad, g * unfused_gelu_derivative(x + b), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(inputs[2].grad, (g * unfused_gelu_derivative(x + b)).sum(axis=(0, 1)), rtol=1e-12)
    assert (x == kept).all(), "bias_gelu must not change its input"


def test_gelu_of_a_non_contiguous_input(block_elements):
    x = rng.standard_normal((6, 5)).T  # a transposed view
    np.testing.assert_allclose(ops.gelu(Tensor(x)).data, unfused_gelu(x), rtol=1e-14, atol=1e-15)
    check_gradients(lambda a: ops.gelu(ops.transpose(a)), [rng.standard_normal((6, 5))])


def test_bias_gelu_refuses_a_misshapen_bias():
    with pytest.raises(ShapeError, match="bias_gelu"):
        ops.bias_gelu(Tensor(np.zeros((2, 3))), Tensor(np.zeros(4)))


def test_layer_norm_gradient_and_statistics(block_elements):
    x, w, b = rng.standard_normal((3, 5, 6)) * 3 + 10, rng.standard_normal(6), rng.standard_normal(6)
    check_gradients(lambda x, w, b: ops.layer_norm(x, w, b), [x, w, b])
    mean = x.mean(axis=-1, keepdims=True)
    unfused = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(ops.layer_norm(Tensor(x), Tensor(w), Tensor(b)).data, unfused, rtol=1e-13, atol=1e-13)


def test_causal_attention_gradient_and_masked_softmax(block_elements):
    q, k, v = (rng.standard_normal((2, 3, 4, 5)) for _ in range(3))
    check_gradients(ops.causal_attention, [q, k, v])
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(5) + np.triu(np.full((4, 4), -np.inf), k=1)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(ops.causal_attention(Tensor(q), Tensor(k), Tensor(v)).data, p @ v,
                               rtol=1e-13, atol=1e-14)
