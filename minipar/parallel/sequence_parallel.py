"""Sequence parallelism: a region for tensor parallelism's layers that keeps activations split along T.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4.2). Under plain tensor parallelism (parallel/tensor_parallel_comm.py) everything between
Megatron's regions, LayerNorm, dropout and the residual stream, is computed whole on all t ranks:
t copies of (B, T, C) activations. Sequence parallelism splits those along the sequence, rank j
holding positions [j T/t, (j+1) T/t), and replaces f and g by

    ag  (replaces f): forward all-gather along T,     backward reduce-scatter along T
    rs  (replaces g): forward reduce-scatter along T, backward all-gather along T

(the paper calls them g and ḡ; here g keeps Megatron's meaning, the allreduce). A ring
allreduce is a reduce-scatter followed by an all-gather, so this moves the same bytes as f
and g; the saving is memory, not traffic (see docs/tensor_parallel.md).

``SequenceParallelRegion`` has the methods of ``TensorParallelRegion``, so the layers take one or
the other and do not change. What it changes besides f and g:

- positions: the embedding adds the position embedding of this rank's positions only;
- dropout: the single-process mask (B, T, C) is drawn and this rank's positions kept, so a run
  with dropout is still the computation of one process;
- gradients: a parameter every rank holds whole (the LayerNorms, the position embedding, the
  row-parallel biases, added after rs) now sees $T/t$ positions, so its gradient is a part of the
  whole one, Partial("sum") over tp: $∂L/∂θ = Σ_τ (∂L/∂y_τ)(∂y_τ/∂θ)$ over all positions $τ$, the other
  terms on the other ranks. The Trainer sums it with every other partial gradient (parallel/placement.py).
  Split parameters need nothing: all that runs between an all-gather and a reduce-scatter sees
  the full sequence.

Layout. The communicator's ``allgather`` and ``reduce_scatter`` stack rank blocks along axis 0:
MPI's Allgather and Reduce_scatter_block see one flat buffer cut into t contiguous pieces. Our
activations are (B, T, C) with the sequence on axis 1, so rank j's positions are B separate runs
of memory, not one block. We therefore move the sequence axis to the front, (T, B, C), and make
the array contiguous: now positions [j T/t, (j+1) T/t) are one contiguous block of (T/t) B C
numbers, exactly the piece MPI assigns to rank j. Megatron keeps its activations in (T, B, C)
order everywhere to avoid this copy; minipar keeps the single-process model's (B, T, C) and pays
one transpose copy per call, which is small next to the matrix products around it.
"""
from minipar import ops
from minipar.backend import host_rng, xp
from minipar.errors import ConfigError, ShapeError
from minipar.nn.module import Module
from minipar.parallel.placement import Partial, placement_of, sum_partial_gradients
from minipar.parallel.tensor_parallel_comm import TensorParallelRegion
from minipar.tensor import Function


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


class GatherFromSequenceParallelRegion(Function):
    """ag (the paper's g): all-gather the sequence forward, reduce-scatter it backward.

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
    """rs (the paper's ḡ): reduce-scatter the sequence forward, all-gather it backward.

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


class SequenceParallelDropout(Module):
    """Dropout that draws the single-process mask, (B, T, C), and keeps this rank's positions."""

    def __init__(self, probability, seed, region):
        self.probability, self.region = probability, region
        self.generator = host_rng(seed)

    def forward(self, x):  # (B, T/t, C)
        if not self.training or self.probability == 0.0:
            return x
        batch, local_length, width = x.shape
        communicator = self.region.communicator
        start = communicator.rank * local_length
        mask = self.generator.random((batch, local_length * communicator.size, width))  # the whole (B, T, C)
        keep = mask[:, start:start + local_length] >= self.probability
        return ops.Dropout.apply(x, xp.asarray(keep, dtype=x.dtype) / (1.0 - self.probability))


class SequenceParallelRegion(TensorParallelRegion):
    """ag and rs in place of f and g; between them, rank j holds positions [j T/t, (j+1) T/t)."""

    gradient_placement = Partial("sum")  # a whole parameter sees T/t positions: its gradient is a part

    def enter(self, x):
        """ag: (B, T/t, C) -> (B, T, C); backward reduce-scatters."""
        return GatherFromSequenceParallelRegion.apply(x, communicator=self.communicator)

    def leave(self, partial):
        """rs: the partial sums (B, T, C) -> this rank's positions of their sum, (B, T/t, C)."""
        return ReduceScatterToSequenceParallelRegion.apply(partial, communicator=self.communicator)

    def positions(self, length):
        size = self.communicator.size
        if length % size:
            raise ConfigError(f"sequence parallelism splits the sequence over the tp ranks: sequence length "
                              f"{length} must be divisible by tp ({size})")
        local = length // size
        return xp.arange(self.communicator.rank * local, (self.communicator.rank + 1) * local)

    def local_length(self, length):
        return length // self.communicator.size

    def dropout(self, probability, seed):
        return SequenceParallelDropout(probability, seed, self)


def finish_tensor_parallel_gradients(parameters, tp_comm):
    """Sum over the tp group the gradients that saw only this rank's slice of the sequence (those
    Partial("sum") on tp, see the module docstring); one allreduce of them all, once per step after
    the last micro-batch's backward. Without sequence parallelism there are none: a no-op.
    (The Trainer does this through ``placement.PartialGradientSum``, with every other axis.)"""
    partial = [p for p in parameters if isinstance(placement_of(p, "tp"), Partial) and p.grad is not None]
    sum_partial_gradients(partial, tp_comm)
