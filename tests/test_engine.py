"""The autograd engine's semantics: accumulation, hooks, deep graphs, no_grad, dtypes."""
import numpy as np
import pytest

from minipar import ops
from minipar.backend import set_default_dtype
from minipar.tensor import Function, Tensor, no_grad


def test_gradient_of_a_shared_input_sums_both_uses():
    x = Tensor(np.array([2.0, 3.0]), requires_grad=True)
    (x * x + x).sum().backward()  # d/dx (x^2 + x) = 2x + 1
    np.testing.assert_allclose(x.grad, [5.0, 7.0])


def test_gradients_accumulate_across_backward_calls_until_zero_grad():
    x = Tensor(np.array([1.0, -1.0]), requires_grad=True)
    (x * 3).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0, 6.0])
    x.zero_grad()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 3.0])


def test_leaf_gradient_is_not_aliased_with_the_upstream_gradient():
    x = Tensor(np.ones(3), requires_grad=True)
    upstream = np.ones(3)
    (x + 0.0).backward(upstream)
    x.grad += 1  # must not write into the caller's array
    np.testing.assert_allclose(upstream, np.ones(3))


def test_later_contributions_add_into_the_leafs_own_array_in_place():
    x = Tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    upstream = np.ones(2, dtype=np.float32)
    (x + 0.0).backward(upstream)
    first = x.grad
    (x * 2).sum().backward()
    assert x.grad is first, "a second contribution should be added into the leaf's gradient array, not a new one"
    np.testing.assert_array_equal(first, np.array([3.0, 3.0], dtype=np.float32))
    np.testing.assert_array_equal(upstream, np.ones(2, dtype=np.float32))  # the caller's array is never written
    assert x.grad.dtype == np.float32, x.grad.dtype


def test_deep_graph_does_not_hit_the_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001**5000, rtol=1e-9)


def test_grad_ready_hooks_fire_once_when_the_gradient_is_final():
    a = Tensor(np.array(1.0), requires_grad=True)
    b = Tensor(np.array(2.0), requires_grad=True)
    seen = []
    a.register_grad_ready_hook(lambda t: seen.append(("a", float(t.grad))))
    b.register_grad_ready_hook(lambda t: seen.append(("b", float(t.grad))))
    hidden = a * b  # a used twice: the hook must wait for both uses
    (hidden * a + b).backward()
    assert sorted(seen) == [("a", 4.0), ("b", 2.0)]  # d/da = 2ab = 4, d/db = a^2 + 1 = 2


def test_hooks_of_late_layers_fire_before_early_layers_finish():
    """Overlap needs the last layer's parameters ready early in backward."""
    weights = [Tensor(np.array(1.0 + i), requires_grad=True) for i in range(4)]
    order = []
    for i, w in enumerate(weights):
        w.register_grad_ready_hook(lambda t, i=i: order.append(i))
    x = Tensor(np.array(1.0))
    for w in weights:
        x = ops.tanh(x * w)
    x.backward()
    assert order == [3, 2, 1, 0]


def test_no_grad_records_nothing():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y._node is None


def test_second_backward_through_a_freed_graph_is_an_error():
    x = Tensor(np.ones(2), requires_grad=True)
    y = (x * 2).sum()
    z = y * 1.0
    z.backward()
    with pytest.raises(RuntimeError, match="freed"):
        (y * 3.0).backward()


def test_float32_by_default_and_float64_on_request():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    set_default_dtype(np.float64)
    try:
        assert Tensor([1.0, 2.0]).dtype == np.float64
    finally:
        set_default_dtype(np.float32)
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = ops.gelu(x * 0.5 + 1.0) / 3.0
    ops.layer_norm(y, Tensor(np.ones(3, np.float32)), Tensor(np.zeros(3, np.float32))).sum().backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32  # no silent float64 upcast


def test_backward_needs_a_gradient_for_non_scalars():
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="non-scalar"):
        (x * 2).backward()


def test_hooks_fire_right_after_the_last_use_whichever_input_the_leaf_is():
    weights = [Tensor(np.array(1.0 + i), requires_grad=True) for i in range(4)]
    order = []
    for i, w in enumerate(weights):
        w.register_grad_ready_hook(lambda t, i=i: order.append(i))
    x = Tensor(np.array(0.5), requires_grad=True)
    for w in weights:
        x = ops.tanh(w * x)  # the leaf first this time
    x.backward()
    assert order == [3, 2, 1, 0]


def test_a_graph_counts_only_its_own_uses_of_a_shared_leaf():
    """Two micro-batch graphs share w (both built before either backward, as under GPipe)."""
    w = Tensor(np.array(3.0), requires_grad=True)
    seen = []
    w.register_grad_ready_hook(lambda t: seen.append(float(t.grad)))
    first, second = w * 2.0, w * w
    unused = w * 7.0  # reachable from neither loss: must not hold the hook back
    first.backward()
    assert seen == [2.0]
    second.backward()
    assert seen == [2.0, 8.0]  # 2 + 2w
    assert unused.requires_grad


class _FirstInputOnly(Function):
    """y = a * b, but backward passes a gradient to a only (None for b)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        (b,) = ctx.saved
        return grad * b, None


def test_a_none_gradient_still_counts_as_a_use_done():
    a = Tensor(np.array(2.0), requires_grad=True)
    b = Tensor(np.array(5.0), requires_grad=True)
    seen = []
    b.register_grad_ready_hook(lambda t: seen.append(float(t.grad)))
    (_FirstInputOnly.apply(a, b) + b * 4.0).backward()
    assert float(a.grad) == 5.0 and float(b.grad) == 4.0 and seen == [4.0]
    c = Tensor(np.array(1.0), requires_grad=True)
    _FirstInputOnly.apply(a, c).backward()  # nothing flows to c: no gradient, no hook
    assert c.grad is None


def test_backward_lets_go_of_an_intermediate_array_once_its_op_has_run():
    """Peak memory: an activation that nothing else holds is freed during backward, not at its end."""
    import weakref

    x = Tensor(np.ones(3), requires_grad=True)
    hidden = x * 2.0
    alive = weakref.ref(hidden.data)  # held only by the tensor hidden, which the graph holds
    loss = hidden.tanh().sum()
    del hidden
    freed_when_x_is_final = []
    x.register_grad_ready_hook(lambda t: freed_when_x_is_final.append(alive() is None))
    loss.backward()
    assert freed_when_x_is_final == [True], "x * 2.0 was still alive after its op had run (when x was final)"
