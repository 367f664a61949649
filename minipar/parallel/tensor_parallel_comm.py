"""The communication of tensor parallelism, as autograd ops: Megatron's f and g.

Each op is a ``Function`` whose forward and backward are a pair of collectives over the
tensor-parallel group (a minipar ``Communicator`` of $t$ ranks). Megatron-LM (Shoeybi et al.
2019, section 3) needs only two:

| op | where                     | forward                     | backward                        |
|----|---------------------------|-----------------------------|---------------------------------|
| f  | enters a parallel region  | $y = x$                     | $dx = Σ_j dy_j$ (allreduce)     |
| g  | leaves a parallel region  | $y = Σ_j x_j$ (allreduce)   | $dx_j = dy$                     |

f sits before a column-parallel matmul: every rank uses the same $x$, but rank $j$'s
branch $X A_j$ only produces part of $∂L/∂x$, so the parts are summed in backward. g sits
after a row-parallel matmul: each rank holds a partial sum $X_j B_j$ of $Y = X B$, which is
summed in forward; the gradient of a sum reaches each summand unchanged.

Where f and g sit is a ``TensorParallelRegion`` (below): the layers of parallel/tensor_parallel.py
call ``region.enter`` before a column-parallel matmul and ``region.leave`` after a row-parallel
one. Sequence parallelism is another region with the same two methods (parallel/sequence_parallel.py),
so the layers do not change with it.

Layout. The communicator's ``allgather`` stacks rank blocks along axis 0, as MPI's Allgather
sees one flat buffer cut into t contiguous pieces; gathering the vocabulary axis of the logits
for sampling moves it to the front first (one transpose copy, outside training).

Every op writes into a freshly allocated output buffer through the communicator's
buffer methods, so ``communicator.counters`` records each call and its bytes.
"""
from minipar.backend import xp
from minipar.errors import ShapeError
from minipar.nn.layers import Dropout
from minipar.ops.fused import mean_over_counted, rows_that_count, scale_counted_rows
from minipar.parallel.placement import Replicate, place
from minipar.tensor import Function

# ---- the collectives on arrays ------------------------------------------------------------

def allreduce_sum(array, communicator):
    """sum_j array_j on every rank, in a new C-contiguous array."""
    out = xp.empty(array.shape, dtype=array.dtype)
    return communicator.allreduce(xp.ascontiguousarray(array), out=out)


# ---- Megatron's f and g ----------------------------------------------------------------------

class CopyToTensorParallelRegion(Function):
    """Megatron's f: identity forward, allreduce backward (dL/dx = sum over ranks of dL/dx_j)."""

    @staticmethod
    def forward(ctx, x, communicator):
        ### BEGIN SOLUTION
        ctx.communicator = communicator
        return x
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad):
        ### BEGIN SOLUTION
        return allreduce_sum(grad, ctx.communicator)
        ### END SOLUTION


class ReduceFromTensorParallelRegion(Function):
    """Megatron's g: allreduce forward ($Y = Σ_j Y_j$), identity backward ($∂L/∂Y_j = ∂L/∂Y$)."""

    @staticmethod
    def forward(ctx, partial, communicator):
        ### BEGIN SOLUTION
        return allreduce_sum(partial, communicator)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad):
        ### BEGIN SOLUTION
        return grad
        ### END SOLUTION


# ---- where f and g sit ------------------------------------------------------------------------

class TensorParallelRegion:
    """Where Megatron's f and g sit, for layers over the ranks of ``communicator``.

    Between the regions the activations are whole, (B, T, C) on every rank, so a parameter every
    rank holds whole (a LayerNorm's, a row-parallel bias) also sees the whole batch: its gradient
    is the same on every rank (``gradient_placement``, parallel/placement.py).
    """

    gradient_placement = Replicate()

    def __init__(self, communicator):
        self.communicator = communicator

    def enter(self, x):
        """f, before a column-parallel matmul: (B, T, C) -> (B, T, C), summed over ranks in backward."""
        return CopyToTensorParallelRegion.apply(x, communicator=self.communicator)

    def leave(self, partial):
        """g, after a row-parallel matmul: the partial sums (B, T, C) -> their sum over ranks."""
        return ReduceFromTensorParallelRegion.apply(partial, communicator=self.communicator)

    def positions(self, length):
        """The positions of a length-T sequence the activations between regions hold: all."""
        return xp.arange(length)

    def local_length(self, length):
        return length

    def dropout(self, probability, seed):
        """Every rank draws the same mask from the same seed, so whole activations stay equal."""
        return Dropout(probability, seed)

    def replicated(self, module):
        """``module`` (a LayerNorm, the position embedding), every rank holding all of it."""
        for parameter in module.parameters():
            place(parameter, tp=self.gradient_placement)
        return module


def all_gather_vocabulary(shard, communicator):
    """(B, T, V/t) on each rank -> (B, T, V): the full logits, for sampling only (no autograd)."""
    vocabulary_first = xp.ascontiguousarray(xp.moveaxis(shard, -1, 0))  # (V/t, B, T): see "Layout"
    gathered = xp.empty((communicator.size * shard.shape[-1], *shard.shape[:-1]), dtype=shard.dtype)
    communicator.allgather(vocabulary_first, gathered)
    return xp.ascontiguousarray(xp.moveaxis(gathered, 0, -1))


# ---- the loss over a vocabulary split across ranks ---------------------------------------------

class VocabParallelCrossEntropy(Function):
    """Mean cross-entropy of logits whose vocabulary axis is split over the tp ranks.

    Rank j holds z_j = the logits for vocabulary entries [s_j, s_j + V/t), shape (B, T, V/t),
    and never sees the others (Shoeybi et al. 2019, section 3: the output layer is fused
    with the loss so the (B, T, V) logits are never gathered). For each row i:

        m_i   = max_j max(z_j[i])                 allreduce(max), for stability only
        S_i   = sum_j sum_v exp(z_j[i, v] - m_i)  allreduce(sum)
        zt_i  = sum_j (z_j[i, t_i] - m_i if t_i is in rank j's range else 0)   allreduce(sum)
        loss  = (1/n) sum_i [log S_i - zt_i]      (the same value on every rank)

    over the n rows whose target is not ``ignore_index`` (padding), as ``ops.cross_entropy``
    counts them; an ignored target lies in no rank's range, so it adds nothing to zt_i.
    Three allreduces of B T numbers each, instead of gathering B T V/t numbers per rank.
    Backward needs no communication: on its own shard,

        dL/dz_j = (softmax_j - onehot_j(t)) / n   for counted rows, 0 for ignored ones,
        softmax_j[i, v] = exp(z_j[i, v] - m_i) / S_i,

    where onehot_j is 1 only at targets inside rank j's range.
    """

    rounds_output = False  # the loss: an fp32 island under 16-bit compute (minipar/mixed_precision.py)

    @staticmethod
    def forward(ctx, logits, targets, communicator, vocab_start, ignore_index=None):
        if logits.shape[:-1] != targets.shape:
            raise ShapeError(f"vocab-parallel cross_entropy: logits {logits.shape} need targets of shape "
                             f"{logits.shape[:-1]}, got {targets.shape}")
        local_vocab = logits.shape[-1]
        full_vocab = local_vocab * communicator.size
        flat_targets = targets.reshape(-1)
        counted, count = rows_that_count(flat_targets, ignore_index, full_vocab, "vocab-parallel cross_entropy")
        ### BEGIN SOLUTION
        rows = logits.reshape(-1, local_vocab)
        row_index = xp.arange(rows.shape[0])

        row_max = rows.max(axis=1)
        communicator.allreduce(row_max, op="max")
        shifted = rows - row_max[:, None]
        exps = xp.exp(shifted)
        sum_exps = exps.sum(axis=1)
        communicator.allreduce(sum_exps)

        mine = (flat_targets >= vocab_start) & (flat_targets < vocab_start + local_vocab)
        local_targets = xp.where(mine, flat_targets - vocab_start, 0)  # 0 is a placeholder where not mine
        target_logits = xp.where(mine, shifted[row_index, local_targets], 0.0)
        communicator.allreduce(target_logits)

        exps /= sum_exps[:, None]  # now this shard's softmax
        row_losses = xp.log(sum_exps) - target_logits  # (B T,) log S_i - zt_i
        ### END SOLUTION
        ctx.save_for_backward(exps, mine, local_targets, counted)
        ctx.shape, ctx.count = logits.shape, count
        return mean_over_counted(row_losses, counted, count, logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        probabilities, mine, local_targets, counted = ctx.saved
        grad_rows = probabilities.copy()
        grad_rows[xp.flatnonzero(mine), local_targets[mine]] -= 1
        scale_counted_rows(grad_rows, grad, counted, ctx.count)
        return grad_rows.reshape(ctx.shape), None
