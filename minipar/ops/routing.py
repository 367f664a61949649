"""Moving rows by index: the two ops a mixture of experts routes tokens with.

    gather_rows(x, index)               out[j] = x[index[j]]   (a zero row where index[j] = -1)
    scatter_add_rows(rows, index, n)    out[i] = sum of rows[j] over every j with index[j] = i
                                        (rows whose index is -1 go nowhere)

Each is the other's adjoint: as matrices, gather is $S$ (one 1 per row, at column index[j]) and
scatter-add is $Sᵀ$, so the backward of one is the other with the same index,

    gather:       dL/dx    = S^T dL/dout = scatter_add_rows(dL/dout, index, len(x))
    scatter-add:  dL/drows = S   dL/dout = gather_rows(dL/dout, index).

A mixture of experts dispatches tokens into its experts' slots with a gather (each slot holds
at most one token; an empty slot is -1) and combines the experts' outputs back into tokens
with a scatter-add (a token chosen by k experts receives k rows). The index is an integer
array, not a Tensor: routing decisions are not differentiable, the gates that weight the
rows are (Shazeer et al. 2017, section 2.1).
"""
from minipar.backend import ON_DEVICE, xp
from minipar.errors import ShapeError
from minipar.ops.fused import scatter_add_rows as _scatter_add_sorted
from minipar.tensor import Function


def _check_index(index, what):
    if not hasattr(index, "dtype") or index.dtype.kind not in "iu" or index.ndim != 1:
        raise ShapeError(f"{what}: index must be a 1-d integer array, got "
                         f"{getattr(index, 'dtype', type(index).__name__)} {getattr(index, 'shape', '')}")


def _gather(x, index):
    """x[index] with zero rows where index is -1 (no data-dependent shapes: no host sync on a GPU)."""
    present = (index >= 0)[:, None]
    return xp.where(present, x[xp.where(index >= 0, index, 0)], 0).astype(x.dtype, copy=False)


def _scatter_add(rows, index, num_rows):
    """Rows with index -1 go to one extra row, dropped at the end."""
    return _scatter_add_sorted(xp.where(index >= 0, index, num_rows), rows, num_rows + 1)[:num_rows]


def _check_range(index, num_rows, what):
    # On a GPU this check would copy to the host and wait on every call; there the routing that
    # makes the indices is trusted, as the Embedding op trusts checked token ids.
    if not ON_DEVICE and index.size and index.max() >= num_rows:
        raise ShapeError(f"{what}: index {int(index.max())} out of range for {num_rows} rows")


class GatherRows(Function):
    """out[j] = x[index[j]], zero where index[j] = -1; backward scatter-adds dL/dout into dL/dx."""

    @staticmethod
    def forward(ctx, x, index):
        _check_index(index, "gather_rows")
        if x.ndim != 2:
            raise ShapeError(f"gather_rows: x must be (rows, width), got {x.shape}")
        _check_range(index, x.shape[0], "gather_rows")
        ctx.index, ctx.num_rows = index, x.shape[0]
        return _gather(x, index)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_add(grad, ctx.index, ctx.num_rows), None


class ScatterAddRows(Function):
    """out[i] = sum_j [index[j] = i] rows[j], for i < num_rows; backward gathers dL/dout by index."""

    @staticmethod
    def forward(ctx, rows, index, num_rows):
        _check_index(index, "scatter_add_rows")
        if rows.ndim != 2 or rows.shape[0] != index.size:
            raise ShapeError(f"scatter_add_rows: rows must be ({index.size}, width) for {index.size} indices, "
                             f"got {rows.shape}")
        _check_range(index, num_rows, "scatter_add_rows")
        ctx.index = index
        return _scatter_add(rows, index, num_rows)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.index), None, None


class AttachAuxiliaryLoss(Function):
    """Forward: x unchanged. Backward: dL/dx = the incoming gradient, and d/d(aux) = ``scale``.

    As if ``scale * aux`` had been added to the final loss, without the loss having to know:
    a layer deep in a model (on any pipeline stage) can add its own term to the objective,
    and the gradient arrives whenever backward passes through the layer. Megatron-LM's MoE
    layer passes its load-balancing loss back the same way. ``scale`` is 1/m when the loss is
    averaged over m micro-batches, so the term is averaged with it.
    """

    @staticmethod
    def forward(ctx, x, aux, scale=1.0):
        if aux.size != 1:
            raise ShapeError(f"attach_auxiliary_loss: aux must be a scalar, got shape {aux.shape}")
        ctx.aux_shape, ctx.aux_dtype, ctx.scale = aux.shape, aux.dtype, scale
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, xp.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype)
