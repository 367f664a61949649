"""The communication of tensor and sequence parallelism, as autograd ops.

Each op is a ``Function`` whose forward and backward are a pair of collectives over the
tensor-parallel group (a minipar ``Communicator`` of t ranks). Megatron-LM (Shoeybi et al.
2019, section 3) needs only two:

    f  (enters a parallel region):  forward  y = x             backward  dx = sum_j dy_j  (allreduce)
    g  (leaves a parallel region):  forward  y = sum_j x_j     backward  dx_j = dy        (allreduce)

f sits before a column-parallel matmul: every rank uses the same x, but rank j's
branch X A_j only produces part of dL/dx, so the parts are summed in backward. g sits
after a row-parallel matmul: each rank holds a partial sum X_j B_j of Y = X B, which is
summed in forward; the gradient of a sum reaches each summand unchanged.

Sequence parallelism (Korthikanti et al. 2022, section 4.2) keeps the activations
between parallel regions split along the sequence, rank j holding positions
[j T/t, (j+1) T/t). The two ops become

    ag  (replaces f): forward all-gather along T,     backward reduce-scatter along T
    rs  (replaces g): forward reduce-scatter along T, backward all-gather along T

(the paper calls them g and ḡ; here g keeps Megatron's meaning, the allreduce). A ring
allreduce is a reduce-scatter followed by an all-gather, so this moves the same bytes as f
and g; the saving is memory, not traffic (see docs/tensor_parallel.md).

Layout. The communicator's ``allgather`` and ``reduce_scatter`` stack rank blocks along
axis 0: MPI's Allgather and Reduce_scatter_block see one flat buffer cut into t
contiguous pieces. Our activations are (B, T, C) with the sequence on axis 1, so rank
j's positions are B separate runs of memory, not one block. We therefore move the
sequence axis to the front, (T, B, C), and make the array contiguous: now positions
[j T/t, (j+1) T/t) are one contiguous block of (T/t) B C numbers, exactly the piece MPI
assigns to rank j. Megatron keeps its activations in (T, B, C) order everywhere to avoid
this copy; minipar keeps the single-process model's (B, T, C) and pays one transpose
copy per call, which is small next to the matrix products around it.

Every op writes into a freshly allocated output buffer through the communicator's
buffer methods, so ``communicator.counters`` records each call and its bytes.
"""
from minipar.backend import xp
from minipar.errors import ShapeError
from minipar.ops.fused import mean_over_counted, rows_that_count, scale_counted_rows
from minipar.tensor import Function

# ---- the collectives on arrays ------------------------------------------------------------

def allreduce_sum(array, communicator):
    """sum_j array_j on every rank, in a new C-contiguous array."""
    out = xp.empty(array.shape, dtype=array.dtype)
    return communicator.allreduce(xp.ascontiguousarray(array), out=out)


def all_gather_sequence(local, communicator):
    """(B, T/t, C) on each rank -> (B, T, C), rank j's block at positions [j T/t, (j+1) T/t)."""
    batch, local_length, width = local.shape
    sequence_first = xp.ascontiguousarray(local.transpose(1, 0, 2))  # (T/t, B, C): see "Layout"
    gathered = xp.empty((communicator.size * local_length, batch, width), dtype=local.dtype)
    communicator.allgather(sequence_first, gathered)
    return xp.ascontiguousarray(gathered.transpose(1, 0, 2))


def reduce_scatter_sequence(full, communicator):
    """(B, T, C) on each rank -> positions [j T/t, (j+1) T/t) of sum_ranks full, on rank j."""
    batch, length, width = full.shape
    if length % communicator.size:
        raise ShapeError(f"reduce-scatter along the sequence: length {length} is not divisible by "
                         f"the {communicator.size} tensor-parallel ranks")
    sequence_first = xp.ascontiguousarray(full.transpose(1, 0, 2))  # (T, B, C): see "Layout"
    local = xp.empty((length // communicator.size, batch, width), dtype=full.dtype)
    communicator.reduce_scatter(sequence_first, local)
    return xp.ascontiguousarray(local.transpose(1, 0, 2))


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
    """Megatron's g: allreduce forward (Y = sum_j Y_j), identity backward (dL/dY_j = dL/dY)."""

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


# ---- sequence parallelism's ag and rs (the paper's g and ḡ) ---------------------------------------

class GatherFromSequenceParallelRegion(Function):
    """Sequence parallelism's ag (the paper's g): all-gather the sequence forward, reduce-scatter it backward.

    Forward: (B, T/t, C) -> (B, T, C), the full sequence a column-parallel matmul needs.
    Backward: every rank's branch contributed to dL/dx at all T positions; summing over
    ranks and keeping only one's own positions is exactly a reduce-scatter.
    """

    @staticmethod
    def forward(ctx, local, communicator):
        ctx.communicator = communicator
        return all_gather_sequence(local, communicator)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sequence(grad, ctx.communicator)


class ReduceScatterToSequenceParallelRegion(Function):
    """Sequence parallelism's rs (the paper's ḡ): reduce-scatter the sequence forward, all-gather it backward.

    Forward: the partial sums (B, T, C) of a row-parallel matmul are summed over ranks and
    each rank keeps its T/t positions. Backward: y_j depends on every rank's partial sum
    at positions j, so each rank needs dL/dy at all positions: an all-gather.
    """

    @staticmethod
    def forward(ctx, partial, communicator):
        ctx.communicator = communicator
        return reduce_scatter_sequence(partial, communicator)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_sequence(grad, ctx.communicator)


def enter_parallel_region(x, communicator, sequence_parallel):
    """Before a column-parallel layer: f on (B, T, C), or ag (all-gather) on (B, T/t, C) under SP."""
    if sequence_parallel:
        return GatherFromSequenceParallelRegion.apply(x, communicator=communicator)
    return CopyToTensorParallelRegion.apply(x, communicator=communicator)


def leave_parallel_region(partial, communicator, sequence_parallel):
    """After a row-parallel layer: g (allreduce) to (B, T, C), or rs (reduce-scatter) to (B, T/t, C)."""
    if sequence_parallel:
        return ReduceScatterToSequenceParallelRegion.apply(partial, communicator=communicator)
    return ReduceFromTensorParallelRegion.apply(partial, communicator=communicator)


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
