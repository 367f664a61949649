"""Elementwise ops with NumPy broadcasting, forward and backward side by side.

Broadcasting copies an input along new or size-1 axes, so the gradient of that input
is the sum of the output gradient over those axes (``unbroadcast``).
"""

from minipar.backend import xp
from minipar.errors import ShapeError
from minipar.tensor import Function


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes along which an input of ``shape`` was broadcast."""
    if grad.shape == shape:
        return grad
    extra_axes = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra_axes))) if extra_axes else grad
    size_one_axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=size_one_axes, keepdims=True) if size_one_axes else grad


def _broadcast_checked(op_name, a, b):
    """The shapes of ``a`` and ``b``, after checking that they broadcast together."""
    a_shape, b_shape = getattr(a, "shape", ()), getattr(b, "shape", ())
    if a_shape != b_shape:  # equal shapes, the common case, need no (slower) broadcast_shapes
        try:
            xp.broadcast_shapes(a_shape, b_shape)
        except ValueError:
            raise ShapeError(f"{op_name}: shapes {a_shape} and {b_shape} do not broadcast") from None
    return a_shape, b_shape


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = _broadcast_checked("add", a, b)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.shapes
        return unbroadcast(grad, a_shape), unbroadcast(grad, b_shape)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = _broadcast_checked("sub", a, b)
        return a - b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.shapes
        return unbroadcast(grad, a_shape), unbroadcast(-grad, b_shape)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = _broadcast_checked("mul", a, b)
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        a_shape, b_shape = ctx.shapes
        return unbroadcast(grad * b, a_shape), unbroadcast(grad * a, b_shape)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = _broadcast_checked("div", a, b)
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        a_shape, b_shape = ctx.shapes
        grad_a = grad / b
        return unbroadcast(grad_a, a_shape), unbroadcast(-grad_a * a / b, b_shape)


class Neg(Function):
    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Power(Function):
    """$y = x^p$ for a constant exponent $p$: $dy/dx = p x^{p−1}$."""

    @staticmethod
    def forward(ctx, x, exponent):
        ctx.save_for_backward(x)
        ctx.exponent = exponent
        return x**exponent

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return grad * ctx.exponent * x ** (ctx.exponent - 1), None


class Exp(Function):
    @staticmethod
    def forward(ctx, x):
        out = xp.exp(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad * out


class Log(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return xp.log(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return grad / x


class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        out = xp.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad * (1 - out * out)


class Relu(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x > 0)
        return xp.maximum(x, 0)

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved
        return grad * positive
