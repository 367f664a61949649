"""Placements: how each parameter lies along each axis of the mesh, and what follows from it.

For every axis of the ``DeviceMesh`` a parameter (or, under ZeRO, the part of it the optimizer
updates) is one of three things (the vocabulary of PyTorch's DTensor):

    Replicate()        every rank of the axis holds the whole tensor, and its gradient is whole too
    Shard(dim)         rank i of the axis holds slice i along ``dim`` (``blocks`` > 1: each of that
                       many equal blocks is cut separately, as fused QKV is); dim None: the axis
                       deals out whole tensors, each rank holding different ones (pipeline stages)
    Partial(op)        every rank holds the whole tensor, but each saw only part of the data, so its
                       gradient is a part: the true one is the sum (op "sum") or mean ("avg") over
                       the axis, or over the ranks ``holders`` of it that hold a copy

The rest is derived, the same way for every axis:

- the gradient sums: a Partial tensor's gradient is reduced over its axis after backward
  (``PartialGradientSum``). Data parallelism is Partial("avg") on dp for every parameter (each
  replica saw $B/dp$ rows), done by the gradient sync with buckets and overlap; sequence
  parallelism is Partial("sum") on tp for the LayerNorms, the position embedding and the
  row-parallel biases (each tp rank saw $T/tp$ positions); the tied embedding is Partial("sum") on
  pp between its two holders, the first and the last stage (each saw one of its two uses);
- the gradient norm's counting: $‖g‖²$ sums over the axes along which some tensor is a Shard
  (``norm_axes``: different ranks hold different numbers); along such an axis a Replicate or
  Partial tensor is counted by one rank only, its first holder (``counts_in_model_sum``);
- ZeRO's parts: Shard(0) on dp of the flattened parameter, the dp average's Partial("avg")
  turned into a reduce-scatter (parallel/zero.py).

Every tensor the parallel side handles carries ``t.placements``, {axis: placement}; an axis not
named is Replicate. ``minipar.nn`` knows nothing of it.
"""
from dataclasses import dataclass

from minipar.backend import xp
from minipar.errors import ConfigError
from minipar.parallel.mesh import AXES


@dataclass(frozen=True)
class Replicate:
    pass


@dataclass(frozen=True)
class Shard:
    dim: int | None  # the tensor dimension that is split; None: whole tensors dealt out
    blocks: int = 1  # equal blocks along dim, each split separately (3 for fused QKV)


@dataclass(frozen=True)
class Partial:
    op: str = "sum"  # "sum" or "avg": how the ranks' gradients make the true one
    holders: tuple | None = None  # the coordinates along the axis that hold a copy; None: all


def placement_of(tensor, axis):
    return getattr(tensor, "placements", {}).get(axis, Replicate())


def place(tensor, **placements):
    """Record ``placements`` ({axis: placement}) on ``tensor``, keeping its others; returns it."""
    unknown = set(placements) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}")
    tensor.placements = {**getattr(tensor, "placements", {}), **placements}
    return tensor


def norm_axes(tensors, mesh):
    """The axes a sum over the whole model (||g||^2) is summed over: those of size > 1 along which
    some tensor is sharded. Every rank of an axis holds such tensors alike, so all agree."""
    return [axis for axis in AXES if mesh.size(axis) > 1
            and any(isinstance(placement_of(t, axis), Shard) for t in tensors)]


def agreed_norm_axes(tensors, mesh):
    """``norm_axes`` as every rank of the world agrees (one small allgather, at construction): a
    pipeline stage without experts must still sum over ep, or the stages would count each other's
    numbers a different number of times."""
    found = {axis for axes in mesh.world.mpi.allgather(norm_axes(tensors, mesh)) for axis in axes}
    return [axis for axis in AXES if axis in found]


def counts_in_model_sum(tensor, mesh, axes):
    """Whether this rank counts ``tensor`` in a sum over ``axes``: a shard always; a whole tensor
    (Replicate, or Partial after its sum) only on the first rank of the axis that holds it."""
    for axis in axes:
        placement = placement_of(tensor, axis)
        if isinstance(placement, Shard):
            continue
        holders = placement.holders if isinstance(placement, Partial) and placement.holders else (0,)
        if mesh.coordinate(axis) != holders[0]:
            return False
    return True


class PartialGradientSum:
    """Sums over the mesh the gradients of the tensors that are Partial("sum") along an axis.

    One allreduce per (axis, holders): the gradients concatenated, so the sequence-parallel sum of
    every LayerNorm is one message. A sum is linear, so its order relative to the others (the dp
    average) does not change the result. ``axes``: the axes to sum (the gradient sync does dp).
    Building it is collective over each axis's group (the holder sets are agreed with one small
    allgather, and a group of the holders is split off), so every rank builds it, once.
    """

    def __init__(self, tensors, mesh, axes):
        self.sums = []  # (communicator, [tensors])
        self.holder_groups = {}  # axis -> [communicator of the holders], on the ranks that hold
        for axis in axes:
            if mesh.size(axis) == 1:
                continue  # nothing to sum, and no message to agree on it
            group = mesh.group(axis)
            by_holders = {}
            for t in tensors:
                placement = placement_of(t, axis)
                if isinstance(placement, Partial) and placement.op == "sum":
                    by_holders.setdefault(placement.holders, []).append(t)
            everyone = sorted({h for keys in group.mpi.allgather(list(by_holders)) for h in keys},
                              key=lambda h: () if h is None else tuple(h))
            for holders in everyone:
                communicator = group
                if holders is not None:  # a group of the ranks that hold a copy (the others pass)
                    inside = group.rank in holders
                    communicator = group.split(color=0 if inside else 1, key=group.rank)
                    if not inside:
                        continue
                    self.holder_groups.setdefault(axis, []).append(communicator)
                if not by_holders.get(holders):  # a placement says this rank holds a copy, yet it has none
                    raise ConfigError(f"{axis} rank {group.rank} is a holder {holders} of a partial gradient "
                                      f"but holds no such tensor")
                self.sums.append((communicator, by_holders[holders]))

    def finish_gradient_sync(self):
        for communicator, tensors in self.sums:
            sum_partial_gradients(tensors, communicator)


def sum_partial_gradients(tensors, communicator):
    """Each tensor's gradient summed over ``communicator`` (a missing one counts as zero), in one
    allreduce of their concatenation, written back where it was."""
    if not tensors:
        return
    flat = xp.concatenate([(t.grad if t.grad is not None else xp.zeros_like(t.data)).reshape(-1) for t in tensors])
    communicator.allreduce(flat)
    offset = 0
    for t in tensors:
        total = flat[offset:offset + t.size].reshape(t.shape)
        if t.grad is not None and t.grad.flags.writeable:
            t.grad[...] = total  # in place: the gradient may live in a buffer (ZeRO's) that is counted once
        else:
            t.grad = total.copy()
        offset += t.size
