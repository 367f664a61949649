"""Every op's backward against central finite differences (float64)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import ops
from minipar.errors import ShapeError
from minipar.gradcheck import check_gradients
from minipar.tensor import Tensor

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


def positive(*shape):
    return rng.uniform(0.5, 2.0, shape)


BINARY_CASES = {
    "same shape": ((3, 4), (3, 4)),
    "row vector": ((3, 4), (4,)),
    "column": ((3, 4), (3, 1)),
    "scalar-like": ((2, 3, 4), (1,)),
    "both broadcast": ((3, 1, 4), (1, 5, 4)),
}


@pytest.mark.parametrize("shapes", BINARY_CASES.values(), ids=BINARY_CASES.keys())
@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div], ids=["add", "sub", "mul", "div"])
def test_binary_ops_with_broadcasting(op, shapes):
    a = randn(*shapes[0])
    b = positive(*shapes[1]) if op is ops.div else randn(*shapes[1])
    check_gradients(op, [a, b])


UNARY_CASES = {  # name: (op, input maker)
    "neg": (ops.neg, randn), "exp": (ops.exp, randn), "tanh": (ops.tanh, randn), "gelu": (ops.gelu, randn),
    "cube": (lambda x: ops.power(x, 3), randn), "sqrt": (lambda x: ops.power(x, 0.5), positive),
    "log": (ops.log, positive),
}


@pytest.mark.parametrize("op,make_input", UNARY_CASES.values(), ids=UNARY_CASES.keys())
def test_unary_ops(op, make_input):
    check_gradients(op, [make_input(3, 5)])


def test_relu_away_from_the_kink():
    x = randn(4, 6)
    x[np.abs(x) < 1e-3] = 0.5  # the derivative is undefined at 0
    check_gradients(ops.relu, [x])


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, True)])
@pytest.mark.parametrize("reduction", [ops.sum, ops.mean, ops.max], ids=["sum", "mean", "max"])
def test_reductions(reduction, axis, keepdims):
    check_gradients(lambda x: reduction(x, axis, keepdims), [randn(3, 4, 5)])


def test_max_splits_gradient_between_ties():
    x = Tensor(np.array([[1.0, 3.0, 3.0]]), requires_grad=True)
    ops.max(x, axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0.0, 0.5, 0.5]])


@pytest.mark.parametrize("a_shape,b_shape", [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5)),
                                             ((2, 1, 3, 4), (5, 4, 2))])
def test_matmul_batched_and_broadcast(a_shape, b_shape):
    check_gradients(ops.matmul, [randn(*a_shape), randn(*b_shape)])


def test_linear_with_and_without_bias():
    check_gradients(ops.linear, [randn(2, 3, 4), randn(4, 5), randn(5)])
    check_gradients(ops.linear, [randn(3, 4), randn(4, 5)])


def test_shape_ops():
    check_gradients(lambda x: ops.reshape(x, (6, 4)), [randn(2, 3, 4)])
    check_gradients(lambda x: ops.transpose(x, (2, 0, 1)), [randn(2, 3, 4)])
    check_gradients(lambda x: ops.transpose(x), [randn(2, 3, 4)])
    check_gradients(lambda x: x[1:, ::2], [randn(4, 5)])
    check_gradients(lambda x: x[:, 2], [randn(4, 5)])


def test_indexing_with_repeated_integer_indices():
    index = np.array([0, 2, 2, 1, 2])
    check_gradients(lambda x: x[index], [randn(4, 3)])


def test_concatenate_and_split():
    check_gradients(lambda a, b: ops.concatenate([a, b], axis=1), [randn(2, 3), randn(2, 4)])
    check_gradients(lambda x: ops.split(x, 3, axis=-1)[1] * ops.split(x, [2, 5], axis=-1)[0][:, :1],
                    [randn(3, 6)])


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_and_log_softmax(axis):
    check_gradients(lambda x: ops.softmax(x, axis), [randn(3, 5) * 3])
    check_gradients(lambda x: ops.log_softmax(x, axis), [randn(3, 5) * 3])


def test_softmax_is_stable_for_huge_inputs():
    out = ops.softmax(Tensor(np.array([[1000.0, 1000.0, -1000.0]]))).data
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.0]])
    assert np.isfinite(ops.log_softmax(Tensor(np.array([[1e4, 0.0]]))).data).all()


def test_layer_norm():
    check_gradients(lambda x, w, b: ops.layer_norm(x, w, b), [randn(2, 3, 6) * 2 + 1, randn(6), randn(6)])


def test_cross_entropy():
    targets = np.array([[0, 3, 3], [4, 1, 0]])
    check_gradients(lambda z: ops.cross_entropy(z, targets), [randn(2, 3, 5) * 2])


def test_cross_entropy_matches_log_softmax_definition():
    logits, targets = randn(4, 7), np.array([1, 6, 0, 1])
    expected = -ops.log_softmax(Tensor(logits)).data[np.arange(4), targets].mean()
    np.testing.assert_allclose(ops.cross_entropy(Tensor(logits), targets).item(), expected, rtol=1e-12)


def test_embedding_with_repeated_ids():
    ids = np.array([[1, 1, 3], [0, 1, 3]])
    check_gradients(lambda w: ops.embedding(w, ids), [randn(5, 4)])
    weight = Tensor(randn(5, 4), requires_grad=True)
    ops.embedding(weight, ids).sum().backward()
    np.testing.assert_allclose(weight.grad[1], np.full(4, 3.0))  # id 1 appears three times
    np.testing.assert_allclose(weight.grad[2], np.zeros(4))


def test_causal_attention():
    q, k, v = randn(2, 2, 5, 3), randn(2, 2, 5, 3), randn(2, 2, 5, 3)
    check_gradients(ops.causal_attention, [q, k, v])


def test_causal_attention_ignores_the_future():
    q, k, v = randn(1, 1, 4, 2), randn(1, 1, 4, 2), randn(1, 1, 4, 2)
    before = ops.causal_attention(Tensor(q), Tensor(k), Tensor(v)).data
    k[..., 3, :] += 10.0
    v[..., 3, :] += 10.0
    after = ops.causal_attention(Tensor(q), Tensor(k), Tensor(v)).data
    np.testing.assert_allclose(before[..., :3, :], after[..., :3, :])
    assert not np.allclose(before[..., 3, :], after[..., 3, :])


def test_dropout_gradient_uses_the_same_mask():
    generator = np.random.default_rng(3)
    mask_seed_state = generator.bit_generator.state

    def build(x):
        generator.bit_generator.state = mask_seed_state  # same mask for every evaluation
        return ops.dropout(x, 0.5, generator)

    check_gradients(build, [randn(4, 6)])


def test_masked_fill():
    mask = np.array([[True, False, False], [False, True, False]])
    check_gradients(lambda x: ops.masked_fill(x, mask, 0.0), [randn(2, 3)])


@settings(max_examples=25, deadline=None)
@given(shape_a=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       drop=st.lists(st.booleans(), min_size=3, max_size=3))
def test_broadcasting_property(shape_a, drop):
    shape_b = tuple(1 if d else n for n, d in zip(shape_a, drop[:len(shape_a)], strict=True))
    check_gradients(lambda a, b: ops.mul(ops.add(a, b), b), [randn(*shape_a), randn(*shape_b)])


def test_shape_errors_name_the_op_and_both_shapes():
    with pytest.raises(ShapeError, match=r"matmul.*\(3, 4\).*\(5, 2\)"):
        ops.matmul(Tensor(randn(3, 4)), Tensor(randn(5, 2)))
    with pytest.raises(ShapeError, match=r"add.*\(3, 4\).*\(5,\)"):
        Tensor(randn(3, 4)) + Tensor(randn(5))
    with pytest.raises(ShapeError, match=r"cross_entropy"):
        ops.cross_entropy(Tensor(randn(3, 4)), np.array([1, 2]))
