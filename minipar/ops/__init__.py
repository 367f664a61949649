"""All differentiable ops, as plain functions on Tensors.

Each op is a ``Function`` (forward and backward side by side) in one of:
  elementwise.py     add, sub, mul, div, neg, power, exp, log, tanh, relu
  activation.py      gelu, bias_gelu (fused, cache-blocked: blocks.py)
  shape.py           sum, mean, max, reshape, transpose, getitem, concatenate
  linear_algebra.py  matmul, linear
  fused.py           softmax, log_softmax, layer_norm, cross_entropy, embedding, dropout
  attention.py       causal_attention (its two halves reused by context parallelism)
  routing.py         gather_rows, scatter_add_rows (a mixture of experts' dispatch and combine)
Derived ops (split, masked_fill) are built from these primitives below.
"""
from minipar.backend import xp
from minipar.ops.activation import BiasGelu, Gelu
from minipar.ops.attention import CausalAttention
from minipar.ops.elementwise import Add, Div, Exp, Log, Mul, Neg, Power, Relu, Sub, Tanh
from minipar.ops.fused import CrossEntropy, Dropout, Embedding, LayerNorm, LogSoftmax, Softmax
from minipar.ops.linear_algebra import LinearFunction, MatMul
from minipar.ops.routing import AttachAuxiliaryLoss, GatherRows, ScatterAddRows
from minipar.ops.shape import Concatenate, GetItem, Max, Mean, Reshape, Sum, Transpose

add, sub, mul, div, neg = Add.apply, Sub.apply, Mul.apply, Div.apply, Neg.apply
exp, log, tanh, relu, gelu = Exp.apply, Log.apply, Tanh.apply, Relu.apply, Gelu.apply
bias_gelu = BiasGelu.apply  # gelu(x + b): the MLP's first bias inside the activation's pass
matmul = MatMul.apply
causal_attention = CausalAttention.apply


def power(x, exponent):
    return Power.apply(x, exponent)


def sum(x, axis=None, keepdims=False):  # noqa: A001  (mirrors the array method's name)
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)


def reshape(x, shape):
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x, axes=None):
    return Transpose.apply(x, axes=axes)


def getitem(x, index):
    return GetItem.apply(x, index=index)


def concatenate(tensors, axis=0):
    return Concatenate.apply(*tensors, axis=axis)


def split(x, sections, axis=-1):
    """Split into ``sections`` equal parts (an int) or at the given boundaries: slices of x."""
    size = x.shape[axis]
    if isinstance(sections, int):
        if size % sections:
            from minipar.errors import ShapeError

            raise ShapeError(f"split: axis {axis} of size {size} does not split into {sections} equal parts")
        boundaries = [size // sections * i for i in range(1, sections)]
    else:
        boundaries = list(sections)
    edges = [0, *boundaries, size]
    prefix = (slice(None),) * (axis % x.ndim)
    return [getitem(x, prefix + (slice(lo, hi),)) for lo, hi in zip(edges[:-1], edges[1:])]


def linear(x, weight, bias=None):
    return LinearFunction.apply(x, weight, bias) if bias is not None else LinearFunction.apply(x, weight)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)


def layer_norm(x, weight, bias, eps=1e-5):
    return LayerNorm.apply(x, weight, bias, eps=eps)


def cross_entropy(logits, targets, ignore_index=None):
    """Mean cross-entropy of integer ``targets`` (shape logits.shape[:-1]) under softmax(logits),
    by log-sum-exp; targets equal to ``ignore_index`` (padding) are left out of the mean."""
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index)


def embedding(weight, ids):
    return Embedding.apply(weight, ids)


def dropout(x, probability, generator, training=True):
    """Zero entries with ``probability``, scale the rest by 1/(1-p); identity when not training."""
    if not training or probability == 0.0:
        return x
    keep = generator.random(x.shape) >= probability  # host generator: randomness, not compute
    keep_mask = xp.asarray(keep, dtype=x.dtype) / (1.0 - probability)
    return Dropout.apply(x, keep_mask)


def masked_fill(x, mask, value):
    """Entries where ``mask`` is True become ``value`` (derived: x * keep + value * mask)."""
    keep = xp.logical_not(mask).astype(x.dtype)
    return x * keep + xp.where(mask, value, 0).astype(x.dtype)


def gather_rows(x, index):
    """out[j] = x[index[j]] for a (rows, width) x and a 1-d integer index; -1 gives a zero row."""
    return GatherRows.apply(x, index)


def scatter_add_rows(rows, index, num_rows):
    """out[i] = sum of rows[j] with index[j] == i, shape (num_rows, width); rows with index -1 are left out."""
    return ScatterAddRows.apply(rows, index, num_rows=num_rows)


def attach_auxiliary_loss(x, aux, scale=1.0):
    """x unchanged, but backward also sends ``scale`` into scalar ``aux``: as if scale·aux were added to the loss."""
    return AttachAuxiliaryLoss.apply(x, aux, scale=scale)
