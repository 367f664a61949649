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


def _shape_of(x):
    return getattr(x, "shape", ())


def _check_broadcast(op_name, a, b):
    if _shape_of(a) == _shape_of(b):  # the common case, and far cheaper than broadcast_shapes
        return
    try:
        xp.broadcast_shapes(_shape_of(a), _shape_of(b))
    except ValueError:
        raise ShapeError(f"{op_name}: shapes {_shape_of(a)} and {_shape_of(b)} do not broadcast") from None


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        _check_broadcast("add", a, b)
        ctx.shapes = (_shape_of(a), _shape_of(b))
        return a + b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.shapes
        return unbroadcast(grad, a_shape), unbroadcast(grad, b_shape)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        _check_broadcast("sub", a, b)
        ctx.shapes = (_shape_of(a), _shape_of(b))
        return a - b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.shapes
        return unbroadcast(grad, a_shape), unbroadcast(-grad, b_shape)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        _check_broadcast("mul", a, b)
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        return unbroadcast(grad * b, _shape_of(a)), unbroadcast(grad * a, _shape_of(b))


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        _check_broadcast("div", a, b)
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        grad_a = grad / b
        return unbroadcast(grad_a, _shape_of(a)), unbroadcast(-grad_a * a / b, _shape_of(b))


class Neg(Function):
    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Power(Function):
    """x ** p for a constant exponent p: d/dx = p x^(p-1)."""

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
