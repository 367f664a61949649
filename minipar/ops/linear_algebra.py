"""Matrix products: batched matmul and the fused affine map of a Linear layer."""
from minipar.backend import xp
from minipar.errors import ShapeError
from minipar.ops.elementwise import unbroadcast
from minipar.tensor import Function


class MatMul(Function):
    """$C = A B$ (``A @ B``) over the last two axes, batch axes broadcast.

    $∂L/∂A = (∂L/∂C) Bᵀ$, $∂L/∂B = Aᵀ (∂L/∂C)$, then summed over broadcast batch axes.
    Each product is computed only if asked for, so when B is a weight its product can wait for W
    (the zero-bubble split, see ``Tensor.backward``).
    """

    defers_weight_gradient = True

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ShapeError(f"matmul: shapes {a.shape} and {b.shape} do not chain "
                             "(both need at least 2 axes and equal inner sizes)")
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        grad_a = unbroadcast(grad @ xp.swapaxes(b, -1, -2), a.shape) if ctx.needs_input_grad(0) else None
        grad_b = unbroadcast(xp.swapaxes(a, -1, -2) @ grad, b.shape) if ctx.needs_input_grad(1) else None
        return grad_a, grad_b


class LinearFunction(Function):
    """$y = x W + b$ for x of shape (..., in), W of shape (in, out), b of shape (out,).

    The weight is stored (in, out) so the code reads like the maths, $Y = X A$, and a
    column-parallel split (Megatron) is literally a split of W's columns.
    Backward flattens the leading axes into one, so each gradient is one matrix product:

    $$∂L/∂x = (∂L/∂y) Wᵀ,   ∂L/∂W = xᵀ (∂L/∂y),   ∂L/∂b = Σ_{rows} ∂L/∂y$$

    The first is B of the zero-bubble split, the other two are W: each is computed only when
    ``needs_input_grad`` asks, so the engine can run them at different times.
    """

    defers_weight_gradient = True

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        if x.shape[-1] != weight.shape[0]:
            raise ShapeError(f"linear: input of shape {x.shape} does not fit a weight of shape {weight.shape}")
        rows = x.reshape(-1, x.shape[-1])  # (B*T, in): one large GEMM beats B small ones
        ctx.save_for_backward(rows, weight)
        ctx.input_shape, ctx.has_bias = x.shape, bias is not None
        out = rows @ weight
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved
        grad_rows = grad.reshape(-1, grad.shape[-1])
        # The model's input (the first layer's x) needs no gradient: skip that product.
        grad_x = (grad_rows @ weight.T).reshape(ctx.input_shape) if ctx.needs_input_grad(0) else None
        grad_weight = rows.T @ grad_rows if ctx.needs_input_grad(1) else None
        grad_bias = grad_rows.sum(axis=0) if ctx.has_bias and ctx.needs_input_grad(2) else None
        return grad_x, grad_weight, grad_bias
