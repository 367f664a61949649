"""Tensor (model) parallelism, Megatron style: the layers that hold slices and where f and g sit.

Each transformer layer is split over the $t$ ranks of a tensor-parallel group (Shoeybi et
al. 2019, section 3). A linear layer $Y = X A$ can be split two ways:

| split           | the weight                       | rank $j$ computes  | rank $j$ needs       |
|-----------------|----------------------------------|--------------------|----------------------|
| column-parallel | $A = [A_1 … A_t]$ by columns     | $Y_j = X A_j$      | all of $X$           |
| row-parallel    | $A = [A_1; …; A_t]$ by rows      | $X_j A_j$, and $Y = Σ_j X_j A_j$ | only $X_j$ |

Column then row chains with no communication in between: the column layer leaves each
rank with a slice $Y_j$, which is exactly the $X_j$ the row layer wants. So

- the MLP is column ($C → 4C/t$, GELU on the local slice, elementwise so exact) then row;
- attention is column (fused QKV, $C → 3C/t$: whole heads of Q, K and V per rank, so each
  rank runs attention for its $n_{head}/t$ heads alone) then row (the output projection).

Entering the pair costs f (identity forward, allreduce backward), leaving it g (allreduce
forward, identity backward): two allreduces of $b·s·h$ numbers per layer in forward and two
in backward, $8 b s h (t−1)/t$ numbers sent per rank on a ring (Narayanan et al. 2021); the
ops themselves are in parallel/tensor_parallel_comm.py.

The vocabulary is split too: the token embedding $E$ (V, C) by rows, rank $j$ holding ids
$[j V/t, (j+1) V/t)$. The embedding looks up only its own ids and g sums the parts; the
tied output layer computes logits for its own $V/t$ entries and the loss is reduced
across ranks without gathering the (B, T, V) logits (VocabParallelCrossEntropy).

One model definition. These layers are what ``TensorParallelLayers`` hands to the single-process
``GPT`` and ``Block`` (minipar/nn): the model's code is the same, only its Linears, its token
embedding and its vocabulary (the logits and the loss) are the parallel ones. Each layer takes a
region (parallel/tensor_parallel_comm.py ``TensorParallelRegion``) that holds the communicator and
says where f and g sit; sequence parallelism (Korthikanti et al. 2022) is another region
(parallel/sequence_parallel.py) with the same methods, so nothing here changes with it.

``tensor_parallel_pieces`` builds the whole chain as exact slices of
``minipar.nn.gpt.initial_state``; every Parameter records its placement on tp (parallel/placement.py)
and the slice of the single-process array it holds (``p.shard``, for checkpoints).
"""
import dataclasses

from minipar import ops
from minipar.backend import ON_DEVICE, xp
from minipar.errors import ConfigError, ShapeError, require_positive_int
from minipar.nn.gpt import GPT, initial_state
from minipar.nn.layers import Layers, zeros
from minipar.nn.module import Module, Parameter
from minipar.parallel import sharding
from minipar.parallel.placement import Shard, place
from minipar.parallel.sequence_parallel import SequenceParallelRegion
from minipar.parallel.tensor_parallel_comm import (
    TensorParallelRegion,
    VocabParallelCrossEntropy,
    all_gather_vocabulary,
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


def as_region(region):
    """``region`` itself, or a bare Communicator taken as plain tensor parallelism's region over it."""
    return region if isinstance(region, TensorParallelRegion) else TensorParallelRegion(region)


def _split_parameter(full_shape, dim, communicator, blocks=1):
    """A zero Parameter of this rank's slice of a full one, Shard(dim) on tp, with its ``sharding.Shard``
    (the slice it takes of a full array); ``tensor_parallel_pieces`` names and fills it."""
    shape = list(full_shape)
    shape[dim] //= communicator.size
    parameter = place(Parameter(zeros(*shape)), tp=Shard(dim, blocks))
    parameter.shard = sharding.Shard("", dim, communicator.rank, communicator.size, blocks)
    return parameter


class ColumnParallelLinear(Module):
    """Y_j = X A_j + b_j: rank j holds columns j of A (C_in, C_out/t) and of b.

    The input goes through f (the region's ``enter``), so dL/dX is summed over the ranks in
    backward. ``blocks=3`` splits each of [Q | K | V] separately, so a fused QKV weight gives
    every rank whole heads of all three.
    """

    def __init__(self, in_features, out_features, region, bias=True, blocks=1):
        self.region = region = as_region(region)  # a bare Communicator: plain Megatron f and g
        self.weight = _split_parameter((in_features, out_features), 1, region.communicator, blocks)
        self.bias = _split_parameter((out_features,), 0, region.communicator, blocks) if bias else None

    def forward(self, x):  # (B, T, C_in) -> (B, T, C_out/t)
        ### BEGIN SOLUTION
        x = self.region.enter(x)
        return ops.linear(x, self.weight, self.bias)
        ### END SOLUTION

    def product_and_bias(self, x):
        """``forward`` without adding b_j: (f(X) A_j, b_j), so the MLP can add b_j inside GELU's pass."""
        return ops.linear(self.region.enter(x), self.weight), self.bias


class RowParallelLinear(Module):
    """$Y = Σ_j X_j A_j + b$: rank $j$ holds rows $j$ of $A$ (C_in/t, C_out); $b$ is replicated.

    The partial products are summed by g (the region's ``leave``). The bias is added once,
    after the sum; adding it on every rank before the sum would count it t times.
    """

    def __init__(self, in_features, out_features, region, bias=True):
        self.region = region = as_region(region)
        self.weight = _split_parameter((in_features, out_features), 0, region.communicator)
        self.bias = place(Parameter(zeros(out_features)), tp=region.gradient_placement) if bias else None

    def forward(self, x):  # (B, T, C_in/t) -> (B, T, C_out)
        ### BEGIN SOLUTION
        out = self.region.leave(ops.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out
        ### END SOLUTION

    def product_and_bias(self, x):
        """``forward`` without adding b: (g(sum_j X_j A_j), b), b to be added once, after the sum."""
        return self.region.leave(ops.linear(x, self.weight)), self.bias


class VocabParallelEmbedding(Module):
    """Token embedding with its vocabulary rows split: rank j holds ids [j V/t, (j+1) V/t).

    Each rank looks up the ids in its range and writes zeros for the others; summing over
    the ranks (g) gives every id its row exactly once.
    """

    def __init__(self, vocab_size, width, region):
        self.region = region = as_region(region)
        self.vocab_size = vocab_size
        self.weight = _split_parameter((vocab_size, width), 0, region.communicator)
        self.vocab_start = region.communicator.rank * (vocab_size // region.communicator.size)

    def forward(self, ids):  # (B, T) -> (B, T, C)
        if not ON_DEVICE and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ShapeError(f"embedding: ids must lie in [0, {self.vocab_size}), "
                             f"got values from {ids.min()} to {ids.max()}")
        mine = (ids >= self.vocab_start) & (ids < self.vocab_start + self.weight.shape[0])
        local_ids = xp.where(mine, ids - self.vocab_start, 0)
        partial = ops.embedding(self.weight, local_ids) * mine[..., None].astype(self.weight.dtype)
        return self.region.leave(partial)


class VocabParallelVocabulary:
    """The head's logits split like the embedding, rank j holding entries [j V/t, (j+1) V/t).

    The tied output layer is column-parallel (x E_j^T, with f before it), and the loss is reduced
    across ranks without gathering the (B, T, V) logits (``VocabParallelCrossEntropy``).
    """

    def __init__(self, region):
        self.region = region

    def read(self, x):  # f before the column-parallel logits x E_j^T
        return self.region.enter(x)

    def cross_entropy(self, logits, targets):  # logits (B, T, V/t) -> the mean loss, the same on every rank
        communicator = self.region.communicator
        return VocabParallelCrossEntropy.apply(logits, targets, communicator=communicator,
                                               vocab_start=communicator.rank * logits.shape[-1])

    def whole(self, logits):
        """The full logits (B, T, V) on every rank, for sampling and evaluation (no gradient).

        Training never calls this: it gathers $(t−1)·V/t$ numbers per position.
        """
        with no_grad():
            return Tensor(all_gather_vocabulary(logits.data, self.region.communicator))


class TensorParallelLayers(Layers):
    """The layers of a GPT under tensor parallelism over ``region``'s ranks (nn/layers.py ``Layers``)."""

    def __init__(self, region):
        self.region = region

    def linear_from_stream(self, in_features, out_features, bias=True, blocks=1):
        return ColumnParallelLinear(in_features, out_features, self.region, bias, blocks)

    def linear_to_stream(self, in_features, out_features, bias=True):
        return RowParallelLinear(in_features, out_features, self.region, bias)

    def layer_norm(self, width):
        return self.region.replicated(super().layer_norm(width))

    def dropout(self, probability, seed):
        return self.region.dropout(probability, seed)

    def token_embedding(self, num_embeddings, embedding_dim):
        return VocabParallelEmbedding(num_embeddings, embedding_dim, self.region)

    def position_embedding(self, num_embeddings, embedding_dim):
        return self.region.replicated(super().position_embedding(num_embeddings, embedding_dim))

    def positions(self, length):
        return self.region.positions(length)

    def vocabulary(self):
        return VocabParallelVocabulary(self.region)


def tensor_parallel_pieces(config, tp_comm, sequence_parallel=False, dtype=None):
    """This rank's sharded ``GPT(config).pieces()``: [embedding, block 0..L-1, head].

    Every parameter is an exact slice of ``initial_state(config)`` and carries its placement on tp
    and its ``sharding.Shard`` (full name, split axis, index = tp rank, count = tp, blocks). Shapes:

        embedding(ids (B, T))         -> x
        block(x)                      -> x
        head(x, targets (B, T))       -> scalar mean loss, the same on every tp rank

    with x of shape (B, T, C), identical on every tp rank, or under sequence parallelism
    (B, T/tp, C), rank j holding positions [j T/tp, (j+1) T/tp). Under SP, sum the partial
    gradients after backward (``sequence_parallel.finish_tensor_parallel_gradients``). Raises
    ConfigError (on every rank alike) for a model that tp does not divide. ``dtype`` as for ``GPT``.
    """
    validate_tensor_parallel(config, tp_comm.size, tp_comm.world_size)
    region = (SequenceParallelRegion if sequence_parallel else TensorParallelRegion)(tp_comm)
    model = GPT(config, initialise=False, dtype=dtype, layers=TensorParallelLayers(region))
    state = initial_state(config, dtype)
    for name, parameter in model.named_parameters():  # the tied weight once, as embedding.token.weight
        split = sharding.shard_of(parameter)
        parameter.shard = sharding.Shard(name) if split is None else dataclasses.replace(split, full_name=name)
        values = parameter.shard.take(state[name])
        if values.shape != parameter.shape:
            raise AssertionError(f"{name}: slice {values.shape} does not fit parameter {parameter.shape}")
        parameter.data[...] = values
    return model.pieces()
