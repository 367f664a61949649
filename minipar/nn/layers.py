"""The layers of a GPT: Linear, Embedding, LayerNorm, Dropout, MLP, attention, Block.

Shapes: B batch, T sequence length, C embedding width (n_embd), H heads, D = C/H head size.
Weights start at zero here; ``minipar.nn.gpt.initialise`` fills them from a seed.
"""
from minipar import ops
from minipar.backend import default_dtype, host_rng, xp
from minipar.nn.module import Module, Parameter


def zeros(*shape):
    return xp.zeros(shape, dtype=default_dtype())


class Linear(Module):
    """y = x W + b with W of shape (in, out), so that Y = X A reads as in the papers."""

    def __init__(self, in_features, out_features, bias=True):
        self.weight = Parameter(zeros(in_features, out_features))
        self.bias = Parameter(zeros(out_features)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


class Embedding(Module):
    def __init__(self, num_embeddings, embedding_dim):
        self.weight = Parameter(zeros(num_embeddings, embedding_dim))

    def forward(self, ids):
        return ops.embedding(self.weight, ids)


class LayerNorm(Module):
    def __init__(self, width, eps=1e-5):
        self.weight = Parameter(xp.ones(width, dtype=default_dtype()))
        self.bias = Parameter(zeros(width))
        self.eps = eps

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Each Dropout draws its masks from its own seeded generator, so runs are reproducible."""

    def __init__(self, probability, seed=0):
        self.probability = probability
        self.generator = host_rng(seed)

    def forward(self, x):
        return ops.dropout(x, self.probability, self.generator, self.training)


class MLP(Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, width, dropout=0.0, bias=True, seed=0):
        self.hidden = Linear(width, 4 * width, bias)
        self.output = Linear(4 * width, width, bias)
        self.dropout = Dropout(dropout, seed)

    def forward(self, x):  # (B, T, C)
        hidden = self.hidden  # its bias is added inside GELU's pass over (B, T, 4C): ops.bias_gelu
        return self.dropout(self.output(ops.bias_gelu(ops.linear(x, hidden.weight), hidden.bias)
                                        if hidden.bias is not None else ops.gelu(hidden(x))))


def split_heads(x, num_heads):
    """(B, T, H*D) -> (B, H, T, D)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H*D)."""
    batch, heads, length, head_size = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_size)


class CausalSelfAttention(Module):
    """Multi-head self-attention in which position t sees only positions <= t.

    One Linear makes Q, K and V at once: its weight is (C, 3C), columns [Q | K | V], and
    inside each block the H heads sit side by side (D columns each).
    """

    def __init__(self, width, num_heads, dropout=0.0, bias=True, seed=0):
        self.num_heads = num_heads
        self.qkv = Linear(width, 3 * width, bias)
        self.output = Linear(width, width, bias)
        self.dropout = Dropout(dropout, seed)

    def forward(self, x):  # (B, T, C)
        q, k, v = ops.split(self.qkv(x), 3, axis=-1)  # 3 x (B, T, C)
        heads = ops.causal_attention(*(split_heads(t, self.num_heads) for t in (q, k, v)))  # (B, H, T, D)
        return self.dropout(self.output(merge_heads(heads)))  # (B, T, C)


class Block(Module):
    """Pre-LN transformer block (GPT-2): x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, num_heads, dropout=0.0, bias=True, seed=0):
        self.attention_norm = LayerNorm(width)
        self.attention = CausalSelfAttention(width, num_heads, dropout, bias, seed)
        self.mlp_norm = LayerNorm(width)
        self.mlp = MLP(width, dropout, bias, seed + 1)

    def forward(self, x):  # (B, T, C)
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))
