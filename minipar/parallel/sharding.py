"""How each parameter of a parallel model relates to the single-process model.

Every Parameter the parallel side handles carries a ``Shard``, attached as the plain
attribute ``p.shard`` (``minipar.nn`` knows nothing of it): the name the parameter has
in the single-process GPT and which slice of that full array it holds. That one description serves three jobs:

- building a parallel model as exact slices of the single-process one (``take``);
- gathering a parallel model back into a single-process state dict (``join``);
- loading a checkpoint saved under one layout into any other.

A fused QKV weight is (C, 3C) with columns [Q | K | V]; splitting its columns plainly
would give rank 0 all of Q and part of K. ``blocks=3`` says: cut each of the three
blocks into ``count`` parts and give this rank its part of each, so every rank gets
whole heads of Q, K and V (Shoeybi et al. 2019, section 3).
"""
from dataclasses import dataclass

from minipar.backend import xp


@dataclass(frozen=True)
class Shard:
    full_name: str  # the parameter's name in the single-process GPT
    axis: int | None = None  # the axis that is split; None = the whole array (replicated)
    index: int = 0  # which part this rank holds
    count: int = 1  # into how many parts the axis is split
    blocks: int = 1  # equal blocks along the axis, each split separately (3 for fused QKV)

    @property
    def is_replicated(self):
        return self.axis is None or self.count == 1

    def take(self, full):
        """This shard's slice of the full array."""
        if self.is_replicated:
            return full.copy()
        block_parts = xp.split(full, self.blocks, axis=self.axis)
        return xp.concatenate([xp.split(b, self.count, axis=self.axis)[self.index] for b in block_parts],
                              axis=self.axis)

    def join(self, parts):
        """The full array from all ``count`` parts, given in index order."""
        if self.is_replicated:
            return parts[0]
        per_part_blocks = [xp.split(p, self.blocks, axis=self.axis) for p in parts]
        return xp.concatenate([xp.concatenate([blocks[b] for blocks in per_part_blocks], axis=self.axis)
                               for b in range(self.blocks)], axis=self.axis)


def shard_of(parameter):
    """The parameter's ``Shard``, or None if the parallel side has not labelled it yet."""
    return getattr(parameter, "shard", None)


def label_replicated(module):
    """Give every unlabelled parameter of a single-process module a replicated Shard; returns the module.

    The model (``minipar.nn``) knows nothing of parallelism; the parallel side calls this
    when it builds pieces from a plain model, so every parameter it handles has a ``shard``.
    The full name is the one the model gave the parameter (``p.name``, set by ``GPT``),
    else its name in ``module``.
    """
    for name, p in module.named_parameters():
        if shard_of(p) is None:
            p.shard = Shard(getattr(p, "name", None) or name)
    return module
