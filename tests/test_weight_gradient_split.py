"""The engine's B/W split (zero-bubble pipelines): B then W gives exactly plain backward's gradients.

B (``backward(defer_weights=True, inputs=...)``) must compute the gradient of the inputs named
and nothing of the weights; W (``.run()``) must then add the weights' gradients, bit for bit as a
plain backward does (same summation order), and fire their grad-ready hooks only then.
"""
import numpy as np
import pytest

from minipar import ops
from minipar.backend import host_rng, to_host
from minipar.gradcheck import numerical_gradient
from minipar.nn.gpt import GPT, GPTConfig
from minipar.tensor import Tensor


def _gpt_and_batch():
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, seed=3)
    model = GPT(config, dtype="float64")
    rng = host_rng(0)
    ids = rng.integers(0, 11, size=(3, 6))
    targets = rng.integers(0, 11, size=(3, 6))
    return model, ids, targets


def _gradients(model):
    return {name: to_host(p.grad).copy() for name, p in model.named_parameters()}


def test_b_then_w_equals_plain_backward_bit_for_bit_on_a_gpt():
    model, ids, targets = _gpt_and_batch()
    for _ in range(2):  # two micro-batches: W accumulates onto an existing .grad the same way
        model(ids, targets)[1].backward()
    expected = _gradients(model)
    model.zero_grad()
    pending = []
    for _ in range(2):
        pending.append(model(ids, targets)[1].backward(defer_weights=True))
    assert all(p.grad is None for p in model.parameters()), "B must leave every weight gradient to W"
    for weights in pending:
        weights.run()
    got = _gradients(model)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name}: B+W differs from backward")


def test_b_computes_the_input_gradient_and_w_the_weights_checked_against_central_differences():
    rng = host_rng(1)
    x0, w0, b0, v0 = (rng.normal(size=shape) for shape in ((4, 3), (3, 5), (5,), (5, 2)))
    probe = rng.normal(size=(4, 2))

    def loss(x, w, b, v):  # a weight used twice (w in both products) and a bias: sums in W
        h = ops.linear(x, w, b).tanh()
        return (((h @ v) * probe).sum() + (ops.matmul(x, w) * h).sum())

    def value(*arrays):
        return loss(*(Tensor(a) for a in arrays)).item()

    x, w, b, v = (Tensor(a.copy(), requires_grad=True) for a in (x0, w0, b0, v0))
    weights = loss(x, w, b, v).backward(defer_weights=True, inputs=(x,))
    assert x.grad is not None and w.grad is None and b.grad is None and v.grad is None
    assert len(weights) > 0
    np.testing.assert_allclose(x.grad, numerical_gradient(value, [x0, w0, b0, v0], 0), rtol=1e-6, atol=1e-8)
    weights.run()
    for index, tensor in ((1, w), (2, b), (3, v)):
        np.testing.assert_allclose(tensor.grad, numerical_gradient(value, [x0, w0, b0, v0], index),
                                   rtol=1e-6, atol=1e-8, err_msg=f"input {index}")


def test_grad_ready_hooks_fire_in_w_not_in_b():
    rng = host_rng(2)
    x = Tensor(rng.normal(size=(4, 3)), requires_grad=True)
    w = Tensor(rng.normal(size=(3, 2)), requires_grad=True)
    fired = []
    w.register_grad_ready_hook(lambda leaf: fired.append(leaf.grad.copy()))
    weights = ops.linear(x, w).sum().backward(defer_weights=True, inputs=(x,))
    assert fired == [], "a weight's hook fired during B, before its gradient exists"
    weights.run()
    assert len(fired) == 1
    np.testing.assert_array_equal(fired[0], x.data.T @ np.ones((4, 2)))


def test_w_runs_once():
    w = Tensor(np.ones((2, 2)), requires_grad=True)
    weights = ops.matmul(Tensor(np.ones((1, 2))), w).sum().backward(defer_weights=True)
    weights.run()
    with pytest.raises(RuntimeError, match="twice"):
        weights.run()
