"""Fused ops with analytic backward: softmax, log-softmax, layer norm, cross-entropy,
embedding and dropout; causal attention is in ops/attention.py (its names are offered here too).

Fusing keeps them numerically stable (subtract the row maximum before ``exp``) and fast
(one backward formula instead of a chain of small ops, each with its own temporaries).
Layer norm's statistics also run block by block of rows (ops/blocks.py), so their several
NumPy passes over a block happen while it is in cache.
"""
from minipar.backend import ON_DEVICE, xp
from minipar.errors import ShapeError
from minipar.ops.attention import (  # noqa: F401  (re-exported: minipar.ops.fused.attention_forward, ...)
    CausalAttention,
    attention_backward,
    attention_forward,
    causal_mask,
    scaled_scores,
)
from minipar.ops.blocks import row_blocks
from minipar.tensor import Function


def _softmax(x, axis=-1):
    e = x - x.max(axis=axis, keepdims=True)  # exp never overflows
    xp.exp(e, out=e)  # in place: attention's scores are among the largest arrays of a step
    e *= 1.0 / e.sum(axis=axis, keepdims=True)  # one division per row, then multiplications
    return e


class Softmax(Function):
    """$p = softmax(x)$, $∂L/∂x = p ⊙ (g − Σ (g ⊙ p))$ along the softmax axis ($g = ∂L/∂p$)."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        p = _softmax(x, axis)
        ctx.save_for_backward(p)
        ctx.axis = axis
        return p

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved
        return p * (grad - (grad * p).sum(axis=ctx.axis, keepdims=True))


class LogSoftmax(Function):
    """$y = x − logsumexp(x)$, $∂L/∂x = g − softmax(x) Σ g$ ($g = ∂L/∂y$)."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        shifted = x - x.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad - xp.exp(out) * grad.sum(axis=ctx.axis, keepdims=True)


class LayerNorm(Function):
    """Layer normalisation over the last axis (Ba, Kiros & Hinton 2016).

    $$x̂ = (x − μ) / σ,   σ = sqrt(var(x) + ε),   y = x̂ ⊙ w + b$$

    $$∂L/∂x = (1/σ) (ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)),   ĝ = g ⊙ w$$

    Forward, unfused (each line a pass over (B, T, C) and a temporary of that size):

        mean = x.mean(axis=-1, keepdims=True)
        centred = x - mean
        inverse_std = 1 / sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
        x_hat = centred * inverse_std
        y = x_hat * weight + bias

    Fused: the same passes on one block of rows at a time, in cache, writing into x_hat and y
    (``out=``, in place); the variance stays two-pass, mean of (x - mean)^2, because the one-pass
    E[x^2] - mean^2 loses the digits that matter when the mean is large against the spread.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps=1e-5):
        if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
            raise ShapeError(f"layer_norm: input {x.shape} needs weight and bias of shape ({x.shape[-1]},), "
                             f"got {weight.shape} and {bias.shape}")
        rows = x.reshape(-1, x.shape[-1])
        x_hat, y = xp.empty(rows.shape, dtype=x.dtype), xp.empty(rows.shape, dtype=x.dtype)
        inverse_std = xp.empty((rows.shape[0], 1), dtype=x.dtype)
        width = rows.shape[1]
        for block in row_blocks(*rows.shape):
            centred, squares, deviation = x_hat[block], y[block], inverse_std[block]
            # mean = sum / width, as NumPy's mean computes it (bit for bit), without its Python-level overhead
            xp.sum(rows[block], axis=1, keepdims=True, out=deviation)
            deviation /= width
            xp.subtract(rows[block], deviation, out=centred)
            xp.multiply(centred, centred, out=squares)  # y's block as scratch until the end
            xp.sum(squares, axis=1, keepdims=True, out=deviation)
            deviation /= width
            deviation += eps
            xp.sqrt(deviation, out=deviation)
            xp.divide(1.0, deviation, out=deviation)
            centred *= deviation  # x_hat
            xp.multiply(centred, weight, out=squares)
            squares += bias  # y
        inverse_std = inverse_std.reshape(*x.shape[:-1], 1)
        ctx.save_for_backward(x_hat.reshape(x.shape), inverse_std, weight)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        ### BEGIN SOLUTION
        x_hat, inverse_std, weight = ctx.saved
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = (rows * x_hat.reshape(rows.shape)).sum(axis=0)
        grad_bias = rows.sum(axis=0)
        g_hat = grad * weight
        grad_x = inverse_std * (g_hat - g_hat.mean(axis=-1, keepdims=True)
                                - x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True))
        return grad_x, grad_weight, grad_bias
        ### END SOLUTION


class CrossEntropy(Function):
    """Mean negative log-likelihood of integer targets under softmax(logits), over the rows that count.

    $$loss = (1/n) Σ_{i: t_i ≠ ignore} [logsumexp(z_i) − z_{i, t_i}]$$

    $$∂L/∂z_i = (softmax(z_i) − onehot(t_i)) / n$$

    for counted rows, 0 for ignored ones; $n$ is the number of counted rows.

    The log-sum-exp form, $logsumexp(z) = m + log Σ_j exp(z_j − m)$ with $m = max_j z_j$, never
    takes the log of a probability: a confident wrong prediction whose target logit is 104 below
    the maximum costs 104, where log(softmax) would underflow to log(0) = inf in float32.
    ``ignore_index``: targets equal to it (padding) count neither in the sum nor in n.
    Under 16-bit compute the loss is an fp32 island: its output is never rounded (minipar/mixed_precision.py).
    """

    rounds_output = False

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=None):
        if logits.shape[:-1] != targets.shape:
            raise ShapeError(f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
                             f"got {targets.shape}")
        rows = logits.reshape(-1, logits.shape[-1])
        flat_targets = targets.reshape(-1)
        counted, count = rows_that_count(flat_targets, ignore_index, rows.shape[1], "cross_entropy")
        safe_targets = flat_targets if counted is None else xp.where(counted, flat_targets, 0)
        shifted = rows - rows.max(axis=1, keepdims=True)  # (N, V), every entry <= 0
        target_logits = shifted[xp.arange(rows.shape[0]), safe_targets]  # (N,)
        sums = xp.exp(shifted, out=shifted).sum(axis=1)  # (N,) in [1, V]; shifted now holds exp
        losses = xp.log(sums) - target_logits  # (N,) logsumexp(z) - z[t], each >= 0 and finite
        shifted *= (1.0 / sums)[:, None]  # softmax(z), for backward
        ctx.save_for_backward(shifted, safe_targets, counted)
        ctx.shape, ctx.count = logits.shape, count
        return mean_over_counted(losses, counted, count, logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        probabilities, targets, counted = ctx.saved
        grad_rows = probabilities.copy()
        grad_rows[xp.arange(grad_rows.shape[0]), targets] -= 1
        scale_counted_rows(grad_rows, grad, counted, ctx.count)
        return grad_rows.reshape(ctx.shape), None


# The rows that count toward a cross-entropy, shared with the vocab-parallel loss
# (minipar/parallel/tensor_parallel_comm.py), which splits only the vocabulary axis.
def rows_that_count(flat_targets, ignore_index, vocab_size, what):
    """``(counted, n)``: the mask of rows whose target is not ``ignore_index`` (None when nothing
    is ignored) and their number. A counted target outside [0, vocab_size) raises ShapeError."""
    counted = None if ignore_index is None else flat_targets != ignore_index
    checked = flat_targets if counted is None else flat_targets[counted]
    if not ON_DEVICE and checked.size and (checked.min() < 0 or checked.max() >= vocab_size):
        raise ShapeError(f"{what}: targets must lie in [0, {vocab_size})"
                         + (f" or equal ignore_index {ignore_index}" if ignore_index is not None else "")
                         + f", got values from {checked.min()} to {checked.max()}")
    return counted, flat_targets.size if counted is None else int(counted.sum())


def mean_over_counted(row_losses, counted, count, dtype):
    """(1/n) sum of the counted rows' losses, as a 0-d array (0 when no row counts)."""
    if counted is not None:
        row_losses = row_losses * counted
    return xp.asarray(row_losses.sum(dtype=dtype) / max(count, 1), dtype=dtype)


def scale_counted_rows(grad_rows, grad, counted, count):
    """dL/dz = grad · (per-row gradient) / n on counted rows, 0 on ignored ones, in place."""
    grad_rows *= grad / max(count, 1)
    if counted is not None:
        grad_rows *= counted[:, None]


def scatter_add_rows(indices, rows, num_rows):
    """out[i] = sum of rows[j] over every j with indices[j] == i  (repeats add up).

    Sorting the indices turns the scatter into sums over contiguous runs, which one
    ``add.reduceat`` does in C; this is much faster than ``add.at`` on the CPU.
    """
    out = xp.zeros((num_rows, rows.shape[-1]), dtype=rows.dtype)
    if indices.size == 0:
        return out
    order = xp.argsort(indices, kind="stable")
    sorted_indices = indices[order]
    run_starts = xp.flatnonzero(xp.diff(sorted_indices, prepend=-1))
    out[sorted_indices[run_starts]] = xp.add.reduceat(rows[order], run_starts, axis=0)
    return out


class Embedding(Function):
    """out[...] = weight[ids[...]]; backward scatter-adds each row of the gradient to its id."""

    rounds_output = False  # exact: its output's numbers are its inputs' (16-bit in, 16-bit out)

    @staticmethod
    def forward(ctx, weight, ids):
        if ids.dtype.kind not in "iu":
            raise ShapeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
        # On a GPU this check would copy to the host and wait on every forward (CuPy wraps bad
        # ids silently): there the training step checks the batch once (train.check_token_ids).
        if not ON_DEVICE and ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
            raise ShapeError(f"embedding: ids must lie in [0, {weight.shape[0]}), "
                             f"got values from {ids.min()} to {ids.max()}")
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.shape[0]
        return weight[ids]

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved
        rows = grad.reshape(-1, grad.shape[-1])
        return scatter_add_rows(ids.reshape(-1), rows, ctx.num_rows), None


class Dropout(Function):
    """Inverted dropout: keep each entry with probability 1-p and scale it by 1/(1-p)."""

    @staticmethod
    def forward(ctx, x, keep_mask):
        ctx.save_for_backward(keep_mask)
        return x * keep_mask

    @staticmethod
    def backward(ctx, grad):
        (keep_mask,) = ctx.saved
        return grad * keep_mask, None
