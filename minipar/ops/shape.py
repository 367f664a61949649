"""Reductions and shape ops: sum/mean/max, reshape, transpose, indexing, concatenate."""
from minipar.backend import xp
from minipar.errors import ShapeError
from minipar.tensor import Function


def _normalise_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


def _expand_reduced(grad, axes, keepdims):
    """Put back the reduced axes (as size 1) so ``grad`` broadcasts against the input."""
    if not keepdims:
        grad = xp.expand_dims(grad, axes) if axes else grad
    return grad


class Sum(Function):
    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axes, ctx.keepdims = x.shape, _normalise_axes(axis, x.ndim), keepdims
        return x.sum(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        grad = _expand_reduced(grad, ctx.axes, ctx.keepdims)
        return xp.broadcast_to(grad, ctx.shape)


class Mean(Function):
    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axes, ctx.keepdims = x.shape, _normalise_axes(axis, x.ndim), keepdims
        ctx.count = 1
        for a in ctx.axes:
            ctx.count *= x.shape[a]
        return x.mean(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        grad = _expand_reduced(grad, ctx.axes, ctx.keepdims)
        return xp.broadcast_to(grad / ctx.count, ctx.shape)


class Max(Function):
    """The gradient flows to the maximal entries, split evenly between ties."""

    rounds_output = False  # exact: its output's numbers are its inputs' (16-bit in, 16-bit out)

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        axes = _normalise_axes(axis, x.ndim)
        out = x.max(axis=axes, keepdims=True)
        is_max = (x == out).astype(x.dtype)
        ctx.save_for_backward(is_max / is_max.sum(axis=axes, keepdims=True))
        ctx.axes, ctx.keepdims = axes, keepdims
        return out if keepdims else xp.squeeze(out, axis=axes)

    @staticmethod
    def backward(ctx, grad):
        (share,) = ctx.saved
        return _expand_reduced(grad, ctx.axes, ctx.keepdims) * share


class Reshape(Function):
    rounds_output = False  # exact: its output's numbers are its inputs' (16-bit in, 16-bit out)

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ShapeError(f"reshape: cannot reshape {x.shape} into {tuple(shape)}") from None

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape)


class Transpose(Function):
    """Permute axes (reverse them when ``axes`` is None); backward applies the inverse permutation."""

    rounds_output = False  # exact: its output's numbers are its inputs' (16-bit in, 16-bit out)

    @staticmethod
    def forward(ctx, x, axes=None):
        axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
        if sorted(axes) != list(range(x.ndim)):
            raise ShapeError(f"transpose: axes {axes} are not a permutation of the {x.ndim} axes of {x.shape}")
        ctx.inverse = tuple(sorted(range(len(axes)), key=axes.__getitem__))
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(ctx.inverse)


def _is_basic_index(index):
    """Slices, integers, None and Ellipsis select without repeats; integer arrays may repeat."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in items)


class GetItem(Function):
    """``x[index]``. Backward scatters the gradient back; repeated integer indices add up."""

    rounds_output = False  # exact: its output's numbers are its inputs' (16-bit in, 16-bit out)

    @staticmethod
    def forward(ctx, x, index):
        if isinstance(index, tuple):
            index = tuple(i.data if hasattr(i, "_node") else i for i in index)
        elif hasattr(index, "_node"):  # a Tensor of indices
            index = index.data
        ctx.shape, ctx.dtype, ctx.index = x.shape, x.dtype, index
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        full = xp.zeros(ctx.shape, dtype=grad.dtype)
        if _is_basic_index(ctx.index):
            full[ctx.index] = grad  # a view: each input element is picked at most once
        else:
            xp.add.at(full, ctx.index, grad)
        return full


class Concatenate(Function):
    rounds_output = False  # exact: its output's numbers are its inputs' (16-bit in, 16-bit out)

    @staticmethod
    def forward(ctx, *arrays, axis=0):
        shapes = [a.shape for a in arrays]
        try:
            out = xp.concatenate(arrays, axis=axis)
        except ValueError:
            raise ShapeError(f"concatenate: shapes {shapes} do not match outside axis {axis}") from None
        ctx.axis = axis
        ctx.boundaries = list(xp.cumsum([s[axis] for s in shapes])[:-1].tolist())
        return out

    @staticmethod
    def backward(ctx, grad):
        return tuple(xp.split(grad, ctx.boundaries, axis=ctx.axis))
