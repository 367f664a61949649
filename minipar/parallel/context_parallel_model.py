"""Context parallelism in a model: the all-gather variant, the attention module, a rank's tokens.

- ``AllGatherAttention``: Llama 3's variant (Dubey et al. 2024, section 3.3.2), all-gather
  K and V, attend with a position mask, reduce-scatter dK and dV.
- ``ContextParallelAttention``: stands in for ``nn.layers.CausalSelfAttention`` (the same
  ``qkv`` and ``output`` Linears, so parameter names and values are unchanged) with the
  attention core run over the cp group.
- ``split_tokens`` / ``gather_tokens``: a batch's (B, T) arrays to this rank's (B, T/N)
  tokens in layout order, and per-rank outputs back to the sequence order.
- ``ContextParallelEmbedding``: the token and position embedding of this rank's tokens;
  ``use_context_parallel`` swaps it and the attention in on a GPT, whose forward then takes
  this rank's tokens; ``context_parallel_pieces`` does it to a list of pipeline pieces (GPT's
  or tensor parallelism's); ``single_process_modules`` / ``single_process_pieces`` swap back for
  a while (generation).
- ``ContextParallelDropout``: one process's dropout mask at this rank's positions, so runs with
  dropout stay equal to one process.

Gradients. Each rank's loss is the mean over its own tokens; all ranks hold equally many,
so the sequence's mean loss is the mean over cp of the ranks' losses. The attention ops
send every key's gradient back to the rank that owns it, so rank $r$'s parameter gradients
are $∂L_r/∂θ$ summed over all the paths through other ranks' attention: averaging them
over the cp group (as over dp) gives the single-process gradient.
"""
from contextlib import contextmanager

from minipar import ops
from minipar.backend import from_host, to_host, xp
from minipar.errors import ConfigError, require_positive_int
from minipar.nn.layers import merge_heads, split_heads
from minipar.nn.module import Module
from minipar.ops.attention import attention_backward, attention_forward
from minipar.parallel.context_parallel import (
    VARIANTS,
    AttentionWork,
    RingAttention,
    check_layout,
    chunks_of_rank,
    pair_kind,
    token_positions,
)
from minipar.parallel.sequence_parallel import SequenceParallelRegion
from minipar.tensor import Function


def rank_major_to_sequence(blocks, positions):
    """(N, B, H, T/N, d) rank blocks -> (B, H, T, d) in the order of ``positions`` (N*T/N,)."""
    size, batch, heads, local, width = blocks.shape
    rank_order = blocks.transpose(1, 2, 0, 3, 4).reshape(batch, heads, size * local, width)
    return rank_order[..., xp.argsort(positions), :]


class AllGatherAttention(Function):
    """All-gather K, V; attend this rank's queries to the whole sequence; reduce-scatter dK, dV.

    The key at gathered index j sits at position p_j; query i (position p_i) sees it when
    p_j <= p_i. The scores are (T/N) x T per head: N times the ring's per-step block.
    """

    @staticmethod
    def forward(ctx, q, k, v, communicator, layout="contiguous", work=None):
        rank, size = communicator.rank, communicator.size
        length = q.shape[-2] * size
        check_layout(length, size, layout)
        work = AttentionWork() if work is None else work
        gathered = xp.empty((2 * size, *k.shape), dtype=k.dtype)  # [K_0, V_0, K_1, V_1, ...]
        communicator.allgather(xp.ascontiguousarray(xp.stack([k, v])), gathered, algorithm="ring")
        positions = xp.concatenate([token_positions(r, size, length, layout) for r in range(size)])
        keys = rank_major_to_sequence(gathered[0::2], positions)  # (B, H, T, d), positions 0..T-1
        values = rank_major_to_sequence(gathered[1::2], positions)
        queries = token_positions(rank, size, length, layout)
        mask = xp.where(xp.arange(length)[None, :] > queries[:, None], -xp.inf, 0.0).astype(q.dtype)
        out, probabilities, _ = attention_forward(q, keys, values, mask)
        _count_allgather_work(work, rank, size, layout, q.shape[-2], probabilities.shape)
        ctx.save_for_backward(q, keys, values, probabilities, positions)
        ctx.communicator = communicator
        return out

    @staticmethod
    def backward(ctx, grad):
        q, keys, values, probabilities, positions = ctx.saved
        communicator = ctx.communicator
        grad_q, grad_keys, grad_values = attention_backward(q, keys, values, probabilities, grad)
        batch, heads, _, width = q.shape
        by_rank = xp.stack([grad_keys[..., positions, :], grad_values[..., positions, :]])  # (2, B, H, T, d)
        by_rank = by_rank.reshape(2, batch, heads, communicator.size, -1, width).transpose(3, 0, 1, 2, 4, 5)
        mine = xp.empty((2, *q.shape), dtype=q.dtype)
        communicator.reduce_scatter(xp.ascontiguousarray(by_rank).reshape(-1, *q.shape), mine, algorithm="ring")
        return grad_q, mine[0], mine[1]


def _count_allgather_work(work, rank, size, layout, local_length, scores_shape):
    chunk = local_length // len(chunks_of_rank(rank, size, layout))
    for query_chunk in chunks_of_rank(rank, size, layout):
        for key_chunk in range(size * len(chunks_of_rank(rank, size, layout))):
            work.count_pair(pair_kind(query_chunk, key_chunk), chunk, chunk)
    work.count_scores(scores_shape)


def context_parallel_attention(q, k, v, communicator, layout="contiguous", variant="ring", overlap=False,
                               work=None):
    """Causal attention over the cp group: q, k, v (B, H, T/N, d) Tensors of this rank's tokens."""
    if variant == "ring":
        return RingAttention.apply(q, k, v, communicator, layout, overlap, work)
    if variant == "allgather":
        return AllGatherAttention.apply(q, k, v, communicator, layout, work)
    raise ConfigError(f"cp attention must be one of {list(VARIANTS)}, got {variant!r}")


class ContextParallelDropout(Module):
    """Dropout of this rank's tokens with the mask one process would draw at their positions.

    Draws the whole (B, T, C) mask from the wrapped layer's generator, as one process does, and
    keeps this rank's positions (under sequence parallelism, this tp rank's share of them), so a
    run with dropout is still the single-process computation. Wraps ``nn.layers.Dropout`` or the
    tensor-parallel ``SequenceParallelDropout``.
    """

    def __init__(self, dropout, communicator, layout="contiguous"):
        self.dropout = dropout  # a child: its generator stays where recomputation finds it
        self.rank, self.size, self.layout = communicator.rank, communicator.size, layout
        self.replaced = {"module": dropout}

    def forward(self, x):  # (B, T/N, C), or (B, T/(N tp), C) under SP
        probability = self.dropout.probability
        if not self.training or probability == 0.0:
            return x
        batch, local_length, width = x.shape
        positions = this_ranks_positions(self.dropout, self.rank, self.size, self.layout, local_length)
        length = local_length * self.size * _sequence_share(self.dropout)[1]
        keep = self.dropout.generator.random((batch, length, width))[:, to_host(positions)] >= probability
        return ops.Dropout.apply(x, from_host(keep.astype(x.dtype)) / (1.0 - probability))


def _sequence_share(module):
    """(index, count) of the slice of a cp rank's tokens this tp rank holds: (0, 1) unless ``module``
    belongs to a sequence-parallel region (SequenceParallelDropout)."""
    region = getattr(module, "region", None)
    if isinstance(region, SequenceParallelRegion):
        return region.communicator.rank, region.communicator.size
    return 0, 1


def this_ranks_positions(module, rank, size, layout, local_length):
    """Positions of the ``local_length`` tokens ``module`` sees on cp rank ``rank`` (its SP share, if any)."""
    index, count = _sequence_share(module)
    positions = token_positions(rank, size, local_length * count * size, layout)
    return positions[index * local_length:(index + 1) * local_length]


class ContextParallelAttention(Module):
    """``CausalSelfAttention`` with its core over the cp group; takes over its Linears and Dropout.

    Under tensor parallelism the same class holds column- and row-parallel Linears and this tp
    rank's n_head/tp heads (counted from the width ``qkv`` returns), so it is wrapped the same way.
    """

    def __init__(self, attention, communicator, layout="contiguous", variant="ring", overlap=False, work=None):
        if variant not in VARIANTS:
            raise ConfigError(f"cp attention must be one of {list(VARIANTS)}, got {variant!r}")
        self.head_size = attention.head_size
        self.qkv, self.output = attention.qkv, attention.output
        self.dropout = ContextParallelDropout(attention.dropout, communicator, layout)
        self.communicator, self.layout, self.variant, self.overlap = communicator, layout, variant, overlap
        self.work = AttentionWork() if work is None else work
        self.replaced = {"module": attention}  # a dict, so its parameters are not listed twice

    def forward(self, x):  # (B, T/cp, C)
        q, k, v = ops.split(self.qkv(x), 3, axis=-1)  # 3 x (B, T/cp, C), C/tp under tensor parallelism
        num_heads = q.shape[-1] // self.head_size
        heads = context_parallel_attention(*(split_heads(t, num_heads) for t in (q, k, v)), self.communicator,
                                           self.layout, self.variant, self.overlap, self.work)  # (B, H, T/cp, D)
        return self.dropout(self.output(merge_heads(heads)))  # (B, T/cp, C)


class ContextParallelEmbedding(Module):
    """Token and position embedding of this rank's tokens, each at its own position (the layout's).

    ids (B, T/N) -> (B, T/N, C). Wraps ``TokenAndPositionEmbedding`` (single-process or built
    from tensor parallelism's layers: the same ``token``, ``position``, ``dropout`` and
    ``positions``); ``positions(n)`` says which of n tokens this process computes, so under
    sequence parallelism tp rank j keeps the j-th of tp equal slices of this rank's tokens.
    """

    def __init__(self, embedding, communicator, layout="contiguous"):
        self.block_size = embedding.block_size
        self.token, self.position = embedding.token, embedding.position
        self.dropout = ContextParallelDropout(embedding.dropout, communicator, layout)
        self.rank, self.size, self.layout = communicator.rank, communicator.size, layout
        self.local_positions = embedding.positions  # all n of n tokens, or this tp rank's slice under SP
        self.replaced = {"module": embedding}  # a dict, so its parameters are not listed twice

    def forward(self, ids):  # (B, T/N) -> (B, T/N, C), or (B, T/(N tp), C) under SP
        length = ids.shape[-1] * self.size
        if length > self.block_size:
            raise ConfigError(f"sequence length {length} ({ids.shape[-1]} tokens on each of {self.size} cp ranks) "
                              f"exceeds block_size {self.block_size}")
        positions = token_positions(self.rank, self.size, length, self.layout)
        positions = positions[self.local_positions(ids.shape[-1])]  # SP: this tp rank's share of them
        return self.dropout(self.token(ids) + self.position(positions))


def use_context_parallel(model, communicator, layout="contiguous", variant="ring", overlap=False):
    """Make a GPT run on this rank's tokens: its embedding and every block's attention swapped.

    Afterwards ``model(ids, targets)`` takes this rank's (B, T/N) tokens (``split_tokens``) and
    returns its (B, T/N, V) logits and the mean loss over its tokens. Parameters (names, objects,
    values) are unchanged. Returns the blocks' AttentionWork counters.
    """
    pieces = context_parallel_pieces(model.pieces(), communicator, layout, variant, overlap)
    model.embedding = pieces[0]
    return [block.attention.work for block in model.blocks]


def context_parallel_pieces(pieces, communicator, layout="contiguous", variant="ring", overlap=False):
    """The same pieces on this rank's tokens: GPT's or tensor parallelism's, all or one pipeline stage's.

    A block (a piece with an ``attention``) has its attention swapped in place; the embedding (a
    piece with ``token`` and ``position``) is replaced by a ContextParallelEmbedding in the list.
    """
    swapped = []
    for piece in pieces:
        if hasattr(piece, "attention"):
            piece.attention = ContextParallelAttention(piece.attention, communicator, layout, variant, overlap)
            if hasattr(piece.mlp, "dropout"):  # a mixture of experts has none
                piece.mlp.dropout = ContextParallelDropout(piece.mlp.dropout, communicator, layout)
        elif hasattr(piece, "token") and hasattr(piece, "position"):
            piece = ContextParallelEmbedding(piece, communicator, layout)
        swapped.append(piece)
    return swapped


def validate_context_parallel(config, cp, layout, variant, world_size, tp=1, sequence_parallel=False):
    """Raise ConfigError (the same on every rank) for a cp layout this model or job cannot take.

    The sequences trained on are ``config.block_size`` long: the layout must cut them evenly, and
    under sequence parallelism each cp rank's T/cp tokens must split over the tp ranks.
    """
    require_positive_int("cp", cp)
    if world_size % cp:
        raise ConfigError(f"cp ({cp}) must divide the number of MPI ranks ({world_size})")
    if variant not in VARIANTS:
        raise ConfigError(f"cp attention must be one of {list(VARIANTS)}, got {variant!r}")
    check_layout(config.block_size, cp, layout)
    if sequence_parallel and (config.block_size // cp) % tp:
        raise ConfigError(f"sequence parallelism splits each cp rank's {config.block_size // cp} tokens "
                          f"(block_size {config.block_size} / cp {cp}) over tp ({tp}): they must be divisible")


@contextmanager
def single_process_modules(model):
    """Within the block the GPT is one process again (same parameters): for generating text,
    whose growing context the cp layout does not split."""
    cp_embedding = model.embedding
    with single_process_pieces(model.pieces()) as pieces:
        model.embedding = pieces[0]
        try:
            yield model
        finally:
            model.embedding = cp_embedding


@contextmanager
def single_process_pieces(pieces):
    """Yields ``pieces`` as one process runs them: every swapped module back for the block."""
    swapped = [(owner, name) for block in pieces if hasattr(block, "attention")
               for owner, name in ((block, "attention"), (block.mlp, "dropout"))
               if isinstance(getattr(owner, name, None), (ContextParallelAttention, ContextParallelDropout))]
    cp_modules = [getattr(owner, name) for owner, name in swapped]
    for (owner, name), module in zip(swapped, cp_modules):
        setattr(owner, name, module.replaced["module"])
    try:
        yield [piece.replaced["module"] if isinstance(piece, ContextParallelEmbedding) else piece for piece in pieces]
    finally:
        for (owner, name), module in zip(swapped, cp_modules):
            setattr(owner, name, module)


def split_tokens(array, rank, size, layout):
    """(B, T, ...) -> (B, T/N, ...): the tokens rank ``rank`` holds, in its layout order."""
    return xp.ascontiguousarray(array[:, token_positions(rank, size, array.shape[1], layout)])


def gather_tokens(local, communicator, layout):
    """Every rank's (B, T/N, ...) -> (B, T, ...) in sequence order, on every rank (for evaluation)."""
    size = communicator.size
    sequence_first = xp.ascontiguousarray(xp.moveaxis(local, 1, 0))  # (T/N, B, ...): one block per rank
    gathered = xp.empty((size * local.shape[1], *sequence_first.shape[1:]), dtype=local.dtype)
    communicator.allgather(sequence_first, gathered)
    length = gathered.shape[0]
    positions = xp.concatenate([token_positions(r, size, length, layout) for r in range(size)])
    in_order = xp.empty_like(gathered)
    in_order[positions] = gathered
    return xp.ascontiguousarray(xp.moveaxis(in_order, 0, 1))
