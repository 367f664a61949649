"""The layers of a GPT: Linear, Embedding, LayerNorm, Dropout, MLP, attention, Block.

Shapes: $B$ batch, $T$ sequence length, $C$ embedding width (n_embd), $H$ heads, $D = C/H$ head size.
Weights start at zero here; ``minipar.nn.gpt.initialise`` fills them from a seed.

``Layers`` says which layer each part of the model is made of. The model asks it, never names
a class, so a parallel layout can hand the same ``Block`` and ``GPT`` its own set (the tensor-
parallel one in parallel/tensor_parallel.py: each Linear holding its slice and talking to its
ranks) without a second copy of the model. Nothing here knows which layouts exist.
"""
from minipar import ops
from minipar.backend import default_dtype, host_rng, xp
from minipar.nn.module import Module, Parameter


def zeros(*shape):
    return xp.zeros(shape, dtype=default_dtype())


class Linear(Module):
    """$y = x W + b$ with $W$ of shape (in, out), so that $Y = X A$ reads as in the papers."""

    def __init__(self, in_features, out_features, bias=True):
        self.weight = Parameter(zeros(in_features, out_features))
        self.bias = Parameter(zeros(out_features)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def product_and_bias(self, x):
        """``forward`` in two parts, x W and b (None without a bias), for a caller that adds b
        itself: the MLP adds it inside GELU's pass (``ops.bias_gelu``). Every Linear a ``Layers``
        set makes answers this, a parallel one with its communication included."""
        return ops.linear(x, self.weight), self.bias


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


class WholeVocabulary:
    """How the output layer's logits (B, T, V) are held: whole, on this process."""

    def read(self, x):
        """The head's input, as the output layer needs it."""
        return x

    def whole(self, logits):
        """Every logit (B, T, V), for sampling and evaluation."""
        return logits

    def cross_entropy(self, logits, targets):
        """The mean loss over the rows."""
        return ops.cross_entropy(logits, targets)


class Layers:
    """The layers a model is built from, one method per role; a parallel layout passes its own set.

    The two Linears of attention and of the MLP have different roles: the first reads the residual
    stream and widens it (QKV, C -> 3C; the MLP's hidden layer, C -> 4C), the second writes back into
    it (C -> C, 4C -> C). ``blocks`` says the output is that many equal blocks side by side ([Q|K|V]).
    Both kinds of Linear have ``product_and_bias(x)`` as well as ``forward`` (see ``Linear``).
    """

    def linear_from_stream(self, in_features, out_features, bias=True, blocks=1):
        return Linear(in_features, out_features, bias)

    def linear_to_stream(self, in_features, out_features, bias=True):
        return Linear(in_features, out_features, bias)

    def layer_norm(self, width):
        return LayerNorm(width)

    def dropout(self, probability, seed):
        return Dropout(probability, seed)

    def token_embedding(self, num_embeddings, embedding_dim):
        return Embedding(num_embeddings, embedding_dim)

    def position_embedding(self, num_embeddings, embedding_dim):
        return Embedding(num_embeddings, embedding_dim)

    def positions(self, length):
        """The positions of a length-T sequence this process computes: all of them."""
        return xp.arange(length)

    def vocabulary(self):
        return WholeVocabulary()


LAYERS = Layers()  # the single-process model's


class MLP(Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, width, dropout=0.0, bias=True, seed=0, layers=LAYERS):
        self.hidden = layers.linear_from_stream(width, 4 * width, bias)
        self.output = layers.linear_to_stream(4 * width, width, bias)
        self.dropout = layers.dropout(dropout, seed)

    def forward(self, x):  # (B, T, C)
        product, bias = self.hidden.product_and_bias(x)  # x W (B, T, 4C) and b: GELU adds b in its own pass
        activation = ops.gelu(product) if bias is None else ops.bias_gelu(product, bias)  # (B, T, 4C)
        return self.dropout(self.output(activation))


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
    inside each block the H heads sit side by side (D columns each). The heads are counted from
    the width QKV returns, so a layer holding some of the heads (tensor parallelism) runs as is.
    """

    def __init__(self, width, num_heads, dropout=0.0, bias=True, seed=0, layers=LAYERS):
        self.head_size = width // num_heads
        self.qkv = layers.linear_from_stream(width, 3 * width, bias, blocks=3)
        self.output = layers.linear_to_stream(width, width, bias)
        self.dropout = layers.dropout(dropout, seed)

    def forward(self, x):  # (B, T, C)
        q, k, v = ops.split(self.qkv(x), 3, axis=-1)  # 3 x (B, T, H*D)
        num_heads = q.shape[-1] // self.head_size
        heads = ops.causal_attention(*(split_heads(t, num_heads) for t in (q, k, v)))  # (B, H, T, D)
        return self.dropout(self.output(merge_heads(heads)))  # (B, T, C)


class Block(Module):
    """Pre-LN transformer block (GPT-2): x + attention(LN(x)), then x + MLP(LN(x)).

    ``mlp``: the position-wise layer to use instead of an MLP (a mixture of experts, nn/moe.py)."""

    def __init__(self, width, num_heads, dropout=0.0, bias=True, seed=0, layers=LAYERS, mlp=None):
        self.attention_norm = layers.layer_norm(width)
        self.attention = CausalSelfAttention(width, num_heads, dropout, bias, seed, layers)
        self.mlp_norm = layers.layer_norm(width)
        self.mlp = MLP(width, dropout, bias, seed + 1, layers) if mlp is None else mlp

    def forward(self, x):  # (B, T, C)
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))
