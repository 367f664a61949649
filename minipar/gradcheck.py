"""Check an op's backward against central finite differences.

For a scalar function $f$ of an input $x$, each partial derivative is approximated by

$$∂f/∂x_i ≈ (f(x + h e_i) − f(x − h e_i)) / (2h),$$

whose error shrinks like $h²$. In float64 with $h$ = 1e-6 the estimate agrees with a correct
analytic gradient to about 1e-8 relative, while a wrong backward is off by $O(1)$.
"""
from minipar.backend import host_rng, xp
from minipar.tensor import Tensor


def numerical_gradient(function, arrays, index, step=1e-6):
    """Central-difference gradient of scalar ``function(*arrays)`` with respect to arrays[index]."""
    x = arrays[index]
    grad = xp.zeros_like(x)
    flat_x, flat_grad = x.reshape(-1), grad.reshape(-1)  # views: writes go to x and grad
    for i in range(flat_x.size):
        original = flat_x[i].item()
        flat_x[i] = original + step
        plus = float(function(*arrays))
        flat_x[i] = original - step
        minus = float(function(*arrays))
        flat_x[i] = original
        flat_grad[i] = (plus - minus) / (2 * step)
    return grad


def check_gradients(build, arrays, differentiable=None, seed=0, atol=1e-7, rtol=1e-6):
    """Compare autograd with central differences for ``build(*tensors) -> Tensor``.

    The output $y$ is reduced with a fixed random weighting, $L = Σ_i w_i y_i$, so every
    element of the output's gradient is exercised, not only its sum. Returns the largest
    absolute error; raises AssertionError naming the input and the worst element.
    """
    arrays = [xp.array(a, dtype=xp.float64) if xp.asarray(a).dtype.kind == "f" else a for a in arrays]
    if differentiable is None:
        differentiable = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    probe = build(*[Tensor(a) for a in arrays])
    weights = xp.asarray(host_rng(seed).standard_normal(probe.shape))

    def scalar_loss(*values):
        return (build(*[Tensor(v) for v in values]).data * weights).sum()

    tensors = [Tensor(a, requires_grad=(i in differentiable)) for i, a in enumerate(arrays)]
    (build(*tensors) * Tensor(weights)).sum().backward()
    worst = 0.0
    for i in differentiable:
        expected = numerical_gradient(scalar_loss, arrays, i)
        got = tensors[i].grad if tensors[i].grad is not None else xp.zeros_like(arrays[i])
        error = xp.abs(got - expected)
        if not xp.all(error <= atol + rtol * xp.abs(expected)):
            where = tuple(int(j) for j in xp.unravel_index(xp.argmax(error), error.shape))
            raise AssertionError(f"input {i}: autograd {got[where]} vs finite difference {expected[where]} "
                                 f"at index {where} (max abs error {error.max():.3e})")
        worst = max(worst, float(error.max()) if error.size else 0.0)
    return worst
