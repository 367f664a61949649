"""Tensor (model) parallelism, Megatron style, with optional sequence parallelism.

Each transformer layer is split over the t ranks of a tensor-parallel group (Shoeybi et
al. 2019, section 3). A linear layer Y = X A can be split two ways:

    column-parallel: A = [A_1 ... A_t] by columns,  Y_j = X A_j        (every rank needs all of X)
    row-parallel:    A = [A_1; ...; A_t] by rows,   Y = sum_j X_j A_j  (rank j needs only X_j)

Column then row chains with no communication in between: the column layer leaves each
rank with a slice Y_j, which is exactly the X_j the row layer wants. So
  - the MLP is column (C -> 4C/t, GELU on the local slice, elementwise so exact) then row;
  - attention is column (fused QKV, C -> 3C/t: whole heads of Q, K and V per rank, so each
    rank runs attention for its n_head/t heads alone) then row (the output projection).
Entering the pair costs f (identity forward, allreduce backward), leaving it g (allreduce
forward, identity backward): two allreduces of b*s*h numbers per layer in forward and two
in backward, 8 b s h (t-1)/t numbers sent per rank on a ring (Narayanan et al. 2021); the
ops themselves are in parallel/tensor_parallel_comm.py.

The vocabulary is split too: the token embedding E (V, C) by rows, rank j holding ids
[j V/t, (j+1) V/t). The embedding looks up only its own ids and g sums the parts; the
tied output layer computes logits for its own V/t entries and the loss is reduced
across ranks without gathering the (B, T, V) logits (VocabParallelCrossEntropy).

Sequence parallelism (Korthikanti et al. 2022) splits what is left, LayerNorm, dropout
and the residual stream, along the sequence: f and g become an all-gather and a
reduce-scatter along T, and the activations between pieces are (B, T/t, C).

``tensor_parallel_pieces`` builds the whole chain as exact slices of
``minipar.nn.gpt.initial_state``, every Parameter labelled with its ``Shard``.
"""
import dataclasses

from minipar import ops
from minipar.backend import ON_DEVICE, host_rng, xp
from minipar.errors import ConfigError, ShapeError, require_positive_int
from minipar.nn.gpt import initial_state
from minipar.nn.layers import Embedding, LayerNorm, merge_heads, split_heads, zeros
from minipar.nn.module import Module, Parameter
from minipar.parallel.sharding import Shard, shard_of
from minipar.parallel.tensor_parallel_comm import (
    VocabParallelCrossEntropy,
    all_gather_vocabulary,
    enter_parallel_region,
    leave_parallel_region,
)
from minipar.tensor import Tensor, no_grad


def validate_tensor_parallel(config, tp, world_size):
    """Raise ConfigError (the same on every rank) if ``config`` cannot be split over ``tp`` of
    ``world_size`` ranks, naming every number that does not divide."""
    require_positive_int("tp", tp)
    if world_size % tp:
        raise ConfigError(f"tp ({tp}) must divide the number of MPI ranks ({world_size})")
    splits = [("attention heads", "n_head", config.n_head), ("MLP hidden units", "4 * n_embd", 4 * config.n_embd),
              ("vocabulary rows", "vocab_size", config.vocab_size)]
    problems = [f"{name} ({value}) must be divisible by tp ({tp}) to split the {what}"
                for what, name, value in splits if value % tp]
    if problems:
        raise ConfigError("tensor parallelism cannot split this model: " + "; ".join(problems))


class ReplicatedPartialGradientParameter(Parameter):
    """A parameter replicated over the tp group (every rank holds all of it) whose gradient is partial.

    Under sequence parallelism every part of the model that is not split over the tp
    ranks (LayerNorms, the position embedding, the biases added after rs) runs on
    this rank's slice of the sequence, so its gradient sums over T/t positions only:
    the full gradient is the sum over the tp group (``finish_tensor_parallel_gradients``).
    """


def _replicated(data, sequence_parallel):
    return ReplicatedPartialGradientParameter(data) if sequence_parallel else Parameter(data)


def _layer_norm_with_partial_gradients(width, sequence_parallel):
    norm = LayerNorm(width)
    norm.weight, norm.bias = (_replicated(p.data, sequence_parallel) for p in (norm.weight, norm.bias))
    return norm


def _split_parameter(full_shape, axis, communicator, blocks=1):
    """A zero Parameter of this rank's slice of a full one; ``tensor_parallel_pieces`` names and fills it."""
    shape = list(full_shape)
    shape[axis] //= communicator.size
    parameter = Parameter(zeros(*shape))
    parameter.shard = Shard("", axis, communicator.rank, communicator.size, blocks)
    return parameter


def _sequence_range(length, communicator, sequence_parallel):
    """The positions [start, stop) this rank holds of a length-T sequence."""
    if not sequence_parallel:
        return 0, length
    local = length // communicator.size
    return communicator.rank * local, (communicator.rank + 1) * local


class ParallelDropout(Module):
    """Dropout that draws the single-process mask, (B, T, C), and keeps this rank's positions.

    Outside sequence parallelism every tp rank draws the same mask from the same seed,
    so the replicated activations stay identical; under it each rank takes its slice,
    so a run with dropout is still the same computation as one process.
    """

    def __init__(self, probability, seed, communicator, sequence_parallel):
        self.probability, self.communicator, self.sequence_parallel = probability, communicator, sequence_parallel
        self.generator = host_rng(seed)

    def forward(self, x):
        if not self.training or self.probability == 0.0:
            return x
        batch, local_length, width = x.shape
        length = local_length * (self.communicator.size if self.sequence_parallel else 1)
        start, stop = _sequence_range(length, self.communicator, self.sequence_parallel)
        keep = self.generator.random((batch, length, width))[:, start:stop] >= self.probability
        return ops.Dropout.apply(x, xp.asarray(keep, dtype=x.dtype) / (1.0 - self.probability))


class ColumnParallelLinear(Module):
    """Y_j = X A_j + b_j: rank j holds columns j of A (C_in, C_out/t) and of b.

    The input goes through f (or, under sequence parallelism, the all-gather ag), so
    dL/dX is summed over the ranks in backward. ``blocks=3`` splits each of [Q | K | V]
    separately, so a fused QKV weight gives every rank whole heads of all three.
    """

    def __init__(self, in_features, out_features, communicator, sequence_parallel=False, bias=True, blocks=1):
        self.communicator, self.sequence_parallel = communicator, sequence_parallel
        self.weight = _split_parameter((in_features, out_features), 1, communicator, blocks)
        self.bias = _split_parameter((out_features,), 0, communicator, blocks) if bias else None

    def forward(self, x):  # (B, T, C_in), or (B, T/t, C_in) under SP -> (B, T, C_out/t)
        ### BEGIN SOLUTION
        x = enter_parallel_region(x, self.communicator, self.sequence_parallel)
        return ops.linear(x, self.weight, self.bias)
        ### END SOLUTION


class RowParallelLinear(Module):
    """Y = sum_j X_j A_j + b: rank j holds rows j of A (C_in/t, C_out); b is replicated.

    The partial products are summed by g (allreduce) or, under sequence parallelism,
    rs (reduce-scatter along T). The bias is added once, after the sum; adding it on
    every rank before the sum would count it t times.
    """

    def __init__(self, in_features, out_features, communicator, sequence_parallel=False, bias=True):
        self.communicator, self.sequence_parallel = communicator, sequence_parallel
        self.weight = _split_parameter((in_features, out_features), 0, communicator)
        self.bias = _replicated(zeros(out_features), sequence_parallel) if bias else None

    def forward(self, x):  # (B, T, C_in/t) -> (B, T, C_out), or (B, T/t, C_out) under SP
        ### BEGIN SOLUTION
        out = leave_parallel_region(ops.linear(x, self.weight), self.communicator, self.sequence_parallel)
        return out + self.bias if self.bias is not None else out
        ### END SOLUTION


class ParallelMLP(Module):
    """C -> 4C/t (column) -> GELU -> C (row): the hidden units split over the ranks."""

    def __init__(self, config, communicator, sequence_parallel, seed):
        width = config.n_embd
        self.hidden = ColumnParallelLinear(width, 4 * width, communicator, sequence_parallel, config.bias)
        self.output = RowParallelLinear(4 * width, width, communicator, sequence_parallel, config.bias)
        self.dropout = ParallelDropout(config.dropout, seed, communicator, sequence_parallel)

    def forward(self, x):
        return self.dropout(self.output(ops.gelu(self.hidden(x))))


class ParallelSelfAttention(Module):
    """Causal attention with n_head/t heads per rank: QKV column-parallel, output row-parallel."""

    def __init__(self, config, communicator, sequence_parallel, seed):
        width = config.n_embd
        self.local_heads = config.n_head // communicator.size
        self.qkv = ColumnParallelLinear(width, 3 * width, communicator, sequence_parallel, config.bias, blocks=3)
        self.output = RowParallelLinear(width, width, communicator, sequence_parallel, config.bias)
        self.dropout = ParallelDropout(config.dropout, seed, communicator, sequence_parallel)

    def forward(self, x):
        q, k, v = ops.split(self.qkv(x), 3, axis=-1)  # 3 x (B, T, C/t): this rank's heads
        heads = ops.causal_attention(*(split_heads(t, self.local_heads) for t in (q, k, v)))
        return self.dropout(self.output(merge_heads(heads)))


class ParallelBlock(Module):
    """Pre-LN block; the LayerNorms are replicated (sequence-sharded under SP)."""

    def __init__(self, config, communicator, sequence_parallel, seed):
        self.attention_norm = _layer_norm_with_partial_gradients(config.n_embd, sequence_parallel)
        self.attention = ParallelSelfAttention(config, communicator, sequence_parallel, seed)
        self.mlp_norm = _layer_norm_with_partial_gradients(config.n_embd, sequence_parallel)
        self.mlp = ParallelMLP(config, communicator, sequence_parallel, seed + 1)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class VocabParallelEmbedding(Module):
    """Token embedding with its vocabulary rows split: rank j holds ids [j V/t, (j+1) V/t).

    Each rank looks up the ids in its range and writes zeros for the others; summing over
    the ranks (g, or rs under SP) gives every id its row exactly once.
    """

    def __init__(self, vocab_size, width, communicator, sequence_parallel=False):
        self.communicator, self.sequence_parallel = communicator, sequence_parallel
        self.vocab_size = vocab_size
        self.weight = _split_parameter((vocab_size, width), 0, communicator)
        self.vocab_start = communicator.rank * (vocab_size // communicator.size)

    def forward(self, ids):  # (B, T) -> (B, T, C), or (B, T/t, C) under SP
        if not ON_DEVICE and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ShapeError(f"embedding: ids must lie in [0, {self.vocab_size}), "
                             f"got values from {ids.min()} to {ids.max()}")
        mine = (ids >= self.vocab_start) & (ids < self.vocab_start + self.weight.shape[0])
        local_ids = xp.where(mine, ids - self.vocab_start, 0)
        partial = ops.embedding(self.weight, local_ids) * mine[..., None].astype(self.weight.dtype)
        return leave_parallel_region(partial, self.communicator, self.sequence_parallel)


class ParallelEmbedding(Module):
    """The first piece: ids (B, T) -> token + position embedding, (B, T, C) or (B, T/t, C) under SP."""

    def __init__(self, config, communicator, sequence_parallel):
        self.communicator, self.sequence_parallel = communicator, sequence_parallel
        self.block_size = config.block_size
        self.token = VocabParallelEmbedding(config.vocab_size, config.n_embd, communicator, sequence_parallel)
        self.position = Embedding(config.block_size, config.n_embd)
        self.position.weight = _replicated(self.position.weight.data, sequence_parallel)
        self.dropout = ParallelDropout(config.dropout, config.seed, communicator, sequence_parallel)

    def forward(self, ids):
        ids = ids.data if isinstance(ids, Tensor) else ids
        length = ids.shape[-1]
        if length > self.block_size:
            raise ConfigError(f"sequence length {length} exceeds block_size {self.block_size}")
        if self.sequence_parallel and length % self.communicator.size:
            raise ConfigError(f"sequence parallelism splits the sequence over the tp ranks: sequence length "
                              f"{length} must be divisible by tp ({self.communicator.size})")
        start, stop = _sequence_range(length, self.communicator, self.sequence_parallel)
        return self.dropout(self.token(ids) + self.position(xp.arange(start, stop)))


class VocabParallelHead(Module):
    """The last piece: final LayerNorm, logits_j = x E_j^T (B, T, V/t), vocab-parallel loss.

    ``token_weight`` is the same Parameter as the embedding's shard E_j (tied, Press &
    Wolf 2017), so both uses add into one gradient.
    """

    def __init__(self, config, token_weight, communicator, sequence_parallel):
        self.communicator, self.sequence_parallel = communicator, sequence_parallel
        self.norm = _layer_norm_with_partial_gradients(config.n_embd, sequence_parallel)
        self.token_weight = token_weight

    def logits_shard(self, x):  # (B, T, C) or (B, T/t, C) under SP -> (B, T, V/t)
        x = enter_parallel_region(self.norm(x), self.communicator, self.sequence_parallel)
        return ops.linear(x, self.token_weight.transpose())

    def forward(self, x, targets):  # -> scalar mean cross-entropy, the same on every rank
        targets = targets.data if isinstance(targets, Tensor) else targets
        vocab_start = self.communicator.rank * self.token_weight.shape[0]
        return VocabParallelCrossEntropy.apply(self.logits_shard(x), targets,
                                               communicator=self.communicator, vocab_start=vocab_start)

    def logits(self, x):
        """The full logits (B, T, V) on every rank, for sampling and evaluation (no gradient).

        Training never calls this: it gathers V/t * (t-1) numbers per position.
        """
        with no_grad():
            return Tensor(all_gather_vocabulary(self.logits_shard(x).data, self.communicator))


def tensor_parallel_pieces(config, tp_comm, sequence_parallel=False, dtype=None):
    """This rank's sharded twin of ``GPT(config).pieces()``: [embedding, block 0..L-1, head].

    Every parameter is an exact slice of ``initial_state(config)`` and carries its
    ``Shard`` (full name, split axis, index = tp rank, count = tp, blocks). Shapes:

        embedding(ids (B, T))         -> x
        block(x)                      -> x
        head(x, targets (B, T))       -> scalar mean loss, the same on every tp rank

    with x of shape (B, T, C), identical on every tp rank, or under sequence parallelism
    (B, T/tp, C), rank j holding positions [j T/tp, (j+1) T/tp). Under SP, call
    ``finish_tensor_parallel_gradients`` after backward. Raises ConfigError (on every
    rank alike) for a model that tp does not divide. ``dtype`` as for ``GPT``.
    """
    validate_tensor_parallel(config, tp_comm.size, tp_comm.world_size)
    embedding = ParallelEmbedding(config, tp_comm, sequence_parallel)
    blocks = [ParallelBlock(config, tp_comm, sequence_parallel, config.seed + 2 * i + 1)
              for i in range(config.n_layer)]
    head = VocabParallelHead(config, embedding.token.weight, tp_comm, sequence_parallel)
    pieces = [embedding, *blocks, head]
    if dtype is not None:
        for piece in pieces:
            piece.to(dtype)

    state = initial_state(config, dtype)
    prefixes = ["embedding.", *(f"blocks.{i}." for i in range(config.n_layer)), "head."]
    placed = set()
    for piece, prefix in zip(pieces, prefixes, strict=True):
        for name, parameter in piece.named_parameters(prefix):
            split = shard_of(parameter)
            if split is not None and split.full_name:
                continue  # the head's tied token weight, already placed by the embedding
            shard = Shard(name) if split is None else dataclasses.replace(split, full_name=name)
            values = shard.take(state[name])
            if values.shape != parameter.shape:
                raise AssertionError(f"{name}: slice {values.shape} does not fit parameter {parameter.shape}")
            parameter.data[...] = values
            parameter.shard = shard
            placed.add(name)
    if placed != set(state):
        raise AssertionError(f"parameters not placed exactly once: {sorted(placed ^ set(state))}")
    return pieces


def finish_tensor_parallel_gradients(parameters, tp_comm):
    """Sum over the tp group the gradients that saw only this rank's slice of the sequence.

    Under sequence parallelism a replicated parameter θ used at positions τ gets
    dL/dθ = sum over all τ of (dL/dy_τ)(dy_τ/dθ), but rank j computes only its T/t
    positions; the other terms live on the other ranks. The parameters concerned are
    exactly the ``ReplicatedPartialGradientParameter``s: every LayerNorm weight and bias (both
    per block and the head's), the position embedding, and the row-parallel biases
    (attention and MLP output, added after rs). Split parameters need nothing: all
    that runs between an all-gather and a reduce-scatter sees the full sequence, so their
    gradients already sum over all T positions (the token embedding's too, as rs's
    backward all-gathers its output gradient). Without sequence parallelism there are no
    such parameters and this is a no-op. All tp ranks hold the same pieces, so they agree
    on the list; one allreduce of the concatenated gradients serves them all. Call it once
    per step, after the last micro-batch's backward (the sum is linear).
    """
    partial = [p for p in parameters if isinstance(p, ReplicatedPartialGradientParameter) and p.grad is not None]
    if not partial:
        return
    flat = xp.concatenate([p.grad.reshape(-1) for p in partial])
    tp_comm.allreduce(flat)
    offset = 0
    for p in partial:
        p.grad = flat[offset:offset + p.size].reshape(p.shape).copy()
        offset += p.size
