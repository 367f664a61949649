"""GELU and bias + GELU, fused: forward and backward side by side, cache-blocked (ops/blocks.py).

GELU, tanh form (Hendrycks & Gimpel 2016), as in GPT-2. Unfused, op by op, as a learner would
write it (each line one or more passes over the MLP's hidden activation, (B, T, 4C), the
largest array of a step, and a temporary of its size):

    u  = sqrt(2/pi) * (x + 0.044715 * x**3)
    t  = tanh(u)
    y  = 0.5 * x * (1 + t)
    dy/dx = 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x**2)

Fused: the same arithmetic with ``out=`` and in-place ufuncs, one block of rows at a time, so
the nine passes of forward and the eleven of backward run in cache and each block meets memory
about twice. Forward keeps $x$ and $t = tanh(u)$ for backward (8 bytes per hidden unit in fp32, as
the planner counts: plan/memory.py).

Bias + GELU. The MLP's first Linear ends with ``out += b``, one more pass; ``bias_gelu`` takes
the product without its bias and adds $b$ inside the block ($h = x + b$, then GELU of $h$). Its
backward gives $∂L/∂h$ and $∂L/∂b = Σ_{rows} ∂L/∂h$, summed block by block while the block is in
cache.
"""
import math

from minipar.backend import xp
from minipar.errors import ShapeError
from minipar.ops.blocks import row_blocks
from minipar.tensor import Function

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def _rows(array):
    """A C-contiguous (rows, last axis) view of ``array`` (a copy only if it is not contiguous)."""
    array = xp.ascontiguousarray(array)
    return array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)


def _gelu_block(h, t, y):
    """t = tanh(u(h)) and y = gelu(h), written into the blocks ``t`` and ``y``."""
    xp.multiply(h, h, out=t)
    t *= _CUBIC
    t += 1.0
    t *= h
    t *= _SQRT_2_OVER_PI  # u
    xp.tanh(t, out=t)
    xp.add(t, 1.0, out=y)
    y *= h
    y *= 0.5


def _gelu_grad_block(h, t, g, d, scratch):
    """d = g * gelu'(h), with t = tanh(u(h)); ``scratch`` is a block-sized temporary."""
    xp.multiply(h, h, out=d)
    d *= 3 * _CUBIC
    d += 1.0
    d *= _SQRT_2_OVER_PI
    d *= h  # x du/dx
    xp.multiply(t, t, out=scratch)
    xp.subtract(1.0, scratch, out=scratch)  # 1 - t^2
    d *= scratch
    d += t
    d += 1.0
    d *= 0.5
    d *= g


def _gelu_forward(ctx, x_rows, shape, bias=None):
    h_rows = x_rows if bias is None else xp.empty(x_rows.shape, dtype=x_rows.dtype)  # saved: h = x (+ b)
    y, t = xp.empty_like(h_rows), xp.empty_like(h_rows)
    for rows in row_blocks(*h_rows.shape):
        h = h_rows[rows]
        if bias is not None:  # h = x + b, written in the same visit to the block (no copy of x first)
            xp.add(x_rows[rows], bias, out=h)
        _gelu_block(h, t[rows], y[rows])
    ctx.save_for_backward(h_rows, t)
    ctx.shape = shape
    return y.reshape(shape)


def _gelu_backward(ctx, grad, bias_gradient=None):
    h_rows, t = ctx.saved
    g_rows = _rows(grad)
    d, blocks = xp.empty_like(h_rows), row_blocks(*h_rows.shape)
    scratch = xp.empty_like(h_rows[blocks[0]])  # one block's temporary, reused
    for rows in blocks:
        block = d[rows]
        _gelu_grad_block(h_rows[rows], t[rows], g_rows[rows], block, scratch[:block.shape[0]])
        if bias_gradient is not None:
            bias_gradient += block.sum(axis=0)
    return d.reshape(ctx.shape)


class Gelu(Function):
    """$y = gelu(x)$, fused (module docstring: the unfused version and the derivative)."""

    @staticmethod
    def forward(ctx, x):
        return _gelu_forward(ctx, _rows(x), x.shape)

    @staticmethod
    def backward(ctx, grad):
        return _gelu_backward(ctx, grad)


class BiasGelu(Function):
    """$y = gelu(x + b)$ for x (..., n) and b (n,), fused; $∂L/∂x = g · gelu'(x + b)$ and
    $∂L/∂b = Σ_{rows} ∂L/∂x$, with $g = ∂L/∂y$."""

    @staticmethod
    def forward(ctx, x, bias):
        if bias.shape != (x.shape[-1],):
            raise ShapeError(f"bias_gelu: input {x.shape} needs a bias of shape ({x.shape[-1]},), got {bias.shape}")
        return _gelu_forward(ctx, x.reshape(-1, x.shape[-1]), x.shape, bias)

    @staticmethod
    def backward(ctx, grad):
        (h_rows, _) = ctx.saved
        bias_gradient = xp.zeros(h_rows.shape[1], dtype=h_rows.dtype)
        grad_x = _gelu_backward(ctx, grad, bias_gradient)
        return grad_x, bias_gradient
