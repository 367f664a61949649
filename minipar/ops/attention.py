"""Causal attention, fused: the scale, the mask and the softmax in one pass, forward and backward.

``attention_forward`` and ``attention_backward`` are the op's two halves, written for any block of
queries and keys, so context parallelism (parallel/context_parallel.py) reuses them on blocks of
the sequence; ``CausalAttention`` puts them together for the whole sequence. The softmax and its
backward run block by block of rows (ops/blocks.py), in place, while each block is in cache.
"""
import math

from minipar.backend import xp
from minipar.errors import ShapeError
from minipar.ops.blocks import row_blocks
from minipar.tensor import Function

_causal_masks = {}


def _masked_softmax_in_place(scores, scale, mask=None):
    """scores <- softmax(scale * scores + mask) along the last axis, block by block of rows, in place.

    Returns the log-sum-exp of each row, l_i = log sum_j exp(S_ij) with S = scale * scores + mask,
    shaped like ``scores`` without its last axis (what blockwise attention merges with).
    Unfused: ``scores *= scale; scores += mask; P = softmax(scores)`` (five passes over
    (B, heads, Tq, Tk) and a temporary of that size); here all of it in place, in cache.
    """
    tq, tk = scores.shape[-2:]
    rows = scores.reshape(-1, tq, tk)
    log_sum_exp = xp.empty(rows.shape[:2], dtype=scores.dtype)
    for block in row_blocks(rows.shape[0], tq * tk):
        s = rows[block]
        s *= scale
        if mask is not None:
            s += mask  # -inf where a query may not look
        row_max = s.max(axis=-1, keepdims=True)
        s -= row_max  # exp never overflows
        xp.exp(s, out=s)
        row_sums = s.sum(axis=-1, keepdims=True)
        s *= 1.0 / row_sums  # one division per row, then multiplications
        log_sum_exp[block] = (row_max + xp.log(row_sums))[..., 0]
    return log_sum_exp.reshape(scores.shape[:-1])


def _softmax_backward_in_place(grad_probabilities, probabilities, scale):
    """dP <- scale * P * (dP - rowsum(dP * P)), block by block of rows, in place (the scores' gradient)."""
    tq, tk = probabilities.shape[-2:]
    gp, p = grad_probabilities.reshape(-1, tq, tk), probabilities.reshape(-1, tq, tk)
    blocks = row_blocks(gp.shape[0], tq * tk)
    scratch = xp.empty_like(p[blocks[0]])
    for block in blocks:
        g, pb = gp[block], p[block]
        products = scratch[:g.shape[0]]
        xp.multiply(g, pb, out=products)
        g -= products.sum(axis=-1, keepdims=True)
        g *= pb
        g *= scale  # masked entries have probability 0, so their gradient is already 0
    return grad_probabilities


def causal_mask(length, dtype):
    """(T, T) with 0 on and below the diagonal and -inf above it, made once per shape."""
    key = (length, xp.dtype(dtype).str)
    if key not in _causal_masks:
        future = xp.triu(xp.ones((length, length), dtype=bool), k=1)
        _causal_masks[key] = xp.where(future, -xp.inf, 0.0).astype(dtype)
    return _causal_masks[key]


def scaled_scores(q, k, mask=None):
    """S = Q K^T / sqrt(d) (+ mask): q (..., Tq, d), k (..., Tk, d), mask (Tq, Tk) of 0 and -inf."""
    scores = q @ xp.swapaxes(k, -1, -2)  # (..., Tq, Tk)
    scores *= 1.0 / math.sqrt(q.shape[-1])
    if mask is not None:
        scores += mask
    return scores


def attention_forward(q, k, v, mask=None):
    """Softmax attention of q over (k, v): ``(output, probabilities, log_sum_exp)``.

    ``log_sum_exp`` (..., Tq) is l_i = log sum_j exp(S_ij), so P_ij = exp(S_ij - l_i): what
    blockwise attention keeps to merge partial results (parallel/context_parallel.py). Every
    row needs at least one unmasked key.
    """
    scores = q @ xp.swapaxes(k, -1, -2)  # (..., Tq, Tk)
    log_sum_exp = _masked_softmax_in_place(scores, 1.0 / math.sqrt(q.shape[-1]), mask)  # now P, in place
    return scores @ v, scores, log_sum_exp


def attention_backward(q, k, v, probabilities, grad, row_dot=None):
    """dQ, dK, dV of $O = P V$ with $P = softmax(S)$, $S = Q Kᵀ / sqrt(d)$, given dO = ``grad``.

    ``row_dot`` is rowsum(dP * P). None computes it from ``probabilities``, which is right
    when they cover every key of the row; a block of keys passes rowsum(dO * O) of the whole
    output, the same number: sum_j P_ij (dO_i . V_j) = dO_i . O_i (Dao et al. 2022).
    """
    grad_v = xp.swapaxes(probabilities, -1, -2) @ grad
    grad_probabilities = grad @ xp.swapaxes(v, -1, -2)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if row_dot is None:  # the fused pass, in place
        grad_scores = _softmax_backward_in_place(grad_probabilities, probabilities, scale)
    else:
        grad_scores = probabilities * (grad_probabilities - row_dot)
        grad_scores *= scale  # masked entries have probability 0: gradient already 0
    return grad_scores @ k, xp.swapaxes(grad_scores, -1, -2) @ q, grad_v


class CausalAttention(Function):
    """Scaled dot-product attention with a causal mask (Vaswani et al. 2017), fused.

    $$S = Q Kᵀ / sqrt(d),   S_{ij} = −∞ (j > i),   P = softmax(S),   O = P V$$

    $$dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP − rowsum(dP ⊙ P)),   dQ = dS K / sqrt(d),   dK = dSᵀ Q / sqrt(d)$$

    The scale, the mask and the softmax are one fused pass (``_masked_softmax_in_place``), as is
    the softmax's backward (``_softmax_backward_in_place``): both in place, block by block of rows.

    q, k, v: (B, heads, T, d). The mask means position i attends only to 0..i, so a
    token never sees the future it is asked to predict. The two halves are
    ``attention_forward`` and ``attention_backward``, which context parallelism reuses
    on blocks of the sequence.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        if not (q.shape == k.shape == v.shape) or q.ndim != 4:
            raise ShapeError(f"causal_attention: q, k, v must share a (B, heads, T, d) shape, "
                             f"got {q.shape}, {k.shape}, {v.shape}")
        output, probabilities, _ = attention_forward(q, k, v, causal_mask(q.shape[-2], q.dtype))
        ctx.save_for_backward(q, k, v, probabilities)
        return output

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probabilities = ctx.saved
        return attention_backward(q, k, v, probabilities, grad)
