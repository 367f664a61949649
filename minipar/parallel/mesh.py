"""The device mesh: the world's ranks as a grid over named axes, one communicator per set of axes.

A layout is a size per axis. The axes have one fixed order, slowest to fastest:

    AXES = ("pp", "dp", "ep", "cp", "tp")

and a rank's coordinates are the digits of its world rank in that mixed radix, the last axis
varying fastest (row-major, as NumPy lays out an array of shape (pp, dp, ep, cp, tp)):

    rank = sum over axes a of coordinate[a] * stride[a],   stride[a] = product of the sizes after a

With ep = cp = 1 this is Megatron-LM's order, rank = tp_rank + tp (dp_rank + dp pp_rank), the one
``parallel/topology.py`` writes out by hand for three axes (Shoeybi et al. 2019; Narayanan et al.
2021): tensor-parallel ranks, which talk inside every layer, are adjacent and so share a node's
fast links; pipeline stages, which talk least, vary slowest. An axis of size 1 has coordinate 0
and leaves every other stride unchanged, so it costs nothing: no rank moves, and its group is
this rank alone, made without communication.

A group over a set of axes is the ranks that share every other coordinate, ordered by the rank
formula restricted to those axes: ``mesh.group("dp")`` are the data-parallel replicas of this
rank's shard, ``mesh.group("dp", "cp")`` the ranks among which a gradient of a replicated
parameter is partial when both split the data. Each group is a minipar ``Communicator``.

A new axis is one entry of ``AXES`` (where it sits says which ranks are neighbours) and, to
reach it from the command line, one flag; nothing here names an axis otherwise.
"""
import math
from dataclasses import dataclass

from mpi4py import MPI

from minipar.comm import Communicator
from minipar.errors import ConfigError, require_positive_int

AXES = ("pp", "dp", "ep", "cp", "tp")  # slowest to fastest; a new axis is one more name here

EVERY_LAYOUT = ("dp", "tp", "pp")  # the axes every layout names (the CLI's --dp --tp --pp); the others when > 1

AXIS_ROLES = {  # what each axis splits, for pictures and messages
    "pp": "pipeline stages: the layers",
    "dp": "data-parallel replicas: the batch",
    "ep": "expert-parallel ranks: the experts of a mixture-of-experts layer",
    "cp": "context-parallel ranks: the sequence, attention included",
    "tp": "tensor-parallel ranks: each layer's matrices",
}


@dataclass(frozen=True)
class MeshShape:
    """A size for each axis of ``AXES`` (1 if not given): the layout, with no MPI in it."""

    sizes: tuple  # one positive int per axis of AXES, in AXES order

    @classmethod
    def of(cls, **sizes):
        """MeshShape.of(dp=2, tp=4): every axis not named has size 1."""
        unknown = sorted(set(sizes) - set(AXES))
        if unknown:
            raise ConfigError(f"unknown mesh axes {unknown}; the axes are {list(AXES)}")
        for axis, size in sizes.items():
            require_positive_int(axis, size)
        return cls(tuple(sizes.get(axis, 1) for axis in AXES))

    def size(self, axis):
        return self.sizes[AXES.index(axis)]

    @property
    def world_size(self):
        return math.prod(self.sizes)

    def stride(self, axis):
        """How far apart in world rank two ranks are whose coordinates differ by 1 on ``axis``."""
        return math.prod(self.sizes[AXES.index(axis) + 1:])

    def coordinates(self, rank):
        """{axis: coordinate} of a world rank (the digits of ``rank`` in the mixed radix)."""
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is not in a mesh of {self.world_size} ranks")
        return {axis: rank // self.stride(axis) % self.size(axis) for axis in AXES}

    def rank_of(self, **coordinates):
        """The world rank at ``coordinates`` (axes not named: 0)."""
        return sum(coordinates.get(axis, 0) * self.stride(axis) for axis in AXES)

    def group_ranks(self, rank, *axes):
        """World ranks of ``rank``'s group over ``axes``, in group-rank order (``group_rank``)."""
        self._check_axes(axes)
        mine = self.coordinates(rank)
        return sorted((r for r in range(self.world_size)
                       if all(c == mine[a] for a, c in self.coordinates(r).items() if a not in axes)),
                      key=lambda r: self.group_rank(r, *axes))

    def group_rank(self, rank, *axes):
        """``rank``'s place in its group over ``axes``: the rank formula over those axes alone."""
        coordinates, index = self.coordinates(rank), 0
        for axis in AXES:
            if axis in axes:
                index = index * self.size(axis) + coordinates[axis]
        return index

    def group_colour(self, rank, *axes):
        """One number per group over ``axes``: the world rank with those axes' coordinates set to 0."""
        coordinates = self.coordinates(rank)
        return self.rank_of(**{a: c for a, c in coordinates.items() if a not in axes})

    def check_world(self, world_size):
        """Raise ConfigError unless the mesh has ``world_size`` ranks (the same on every rank, no message)."""
        if self.world_size != world_size:
            named = [*EVERY_LAYOUT, *self._optional_axes_in_use()]
            raise ConfigError(f"{' x '.join(named)} = {' x '.join(str(self.size(a)) for a in named)} = "
                              f"{self.world_size} does not equal the number of MPI ranks ({world_size}); "
                              f"launch with mpiexec -n {self.world_size} or change the layout")

    def _optional_axes_in_use(self):
        """The axes beyond dp, tp and pp that this layout uses (size > 1), slowest first: ep, cp, ..."""
        return [axis for axis in AXES if axis not in EVERY_LAYOUT and self.size(axis) > 1]

    def _check_axes(self, axes):
        unknown = [axis for axis in axes if axis not in AXES]
        if unknown or not axes:
            raise ConfigError(f"a group names one or more of the axes {list(AXES)}, got {list(axes)}")

    def describe(self):
        """A text picture of the mesh: one line per pipeline stage, a box per data-parallel replica, and
        inside it a box per rank of each further axis in use (ep, cp), the tp ranks innermost."""
        used = [axis for axis in AXES if self.size(axis) > 1] or ["tp"]
        sizes = " x ".join(f"{axis} {self.size(axis)}" for axis in used)
        formula = " + ".join(f"{axis}_rank" + (f" * {self.stride(axis)}" if self.stride(axis) > 1 else "")
                             for axis in reversed(used))
        lines = [f"world = {sizes} = {self.world_size} ranks", f"rank = {formula}   (tp fastest)", ""]
        boxes = ["dp", *self._optional_axes_in_use()]
        for stage in range(self.size("pp")):
            lines.append(f"stage {stage}: " + self._draw(boxes, {"pp": stage}))
        lines += ["", "[ ... ] = one tensor-parallel group; a group over an axis = the ranks that differ only there;",
                  "rows = pipeline stages. Axes, slowest to fastest:"]
        lines += [f"  {axis} = {self.size(axis)}: {AXIS_ROLES[axis]}" for axis in AXES]
        return "\n".join(lines)

    def _draw(self, boxes, fixed):
        """``boxes`` axes as labelled boxes, outermost first, around the tp ranks side by side."""
        if not boxes:
            return "[ " + " ".join(f"{self.rank_of(**fixed, tp=t):>2}" for t in range(self.size("tp"))) + " ]"
        axis, inner = boxes[0], boxes[1:]
        parts = [self._draw(inner, {**fixed, axis: i}) for i in range(self.size(axis))]
        if not inner:
            return "   ".join(f"{axis}{i}{part}" for i, part in enumerate(parts))
        return "  ".join(f"{axis}{i}{{ {part} }}" for i, part in enumerate(parts))


class DeviceMesh:
    """A MeshShape bound to MPI: this rank's coordinates and its groups, as Communicators.

    The group of each single axis of size > 1 is made when the mesh is (every rank splits the world
    in the same order, so no rank waits); a group over several axes, ``group("dp", "cp")``, on its
    first call, which is then collective: every rank of the world calls it, in the same order. A
    group over axes of size 1 only is this rank alone, made when asked, without a message.
    """

    def __init__(self, shape, world):
        """``world``: a minipar Communicator over all ranks (its size must be shape.world_size)."""
        shape.check_world(world.size)  # on every rank, before any message
        self.shape, self.world = shape, world
        self.coordinates = shape.coordinates(world.rank)
        self._groups = {}
        for axis in AXES:  # in one order on every rank; an axis of size 1 needs no split (made when asked)
            if shape.size(axis) > 1:
                self.group(axis)

    def coordinate(self, axis):
        return self.coordinates[axis]

    def size(self, axis):
        return self.shape.size(axis)

    def group(self, *axes):
        """The Communicator of this rank's group over ``axes`` (ranks ordered as ``MeshShape.group_rank``).

        Axes of size 1 are dropped first, so ``group("dp", "cp")`` with cp = 1 is ``group("dp")``,
        the same object, and a group over size-1 axes only is this rank alone (one per axis set, so
        each keeps its own counters)."""
        self.shape._check_axes(axes)
        key = tuple(axis for axis in AXES if axis in axes and self.shape.size(axis) > 1)
        if not key:
            key = ("alone", *(axis for axis in AXES if axis in axes))
        if key not in self._groups:
            rank = self.world.rank
            if key[0] == "alone":
                self._groups[key] = Communicator(MPI.COMM_SELF, self.world.transport)
            else:
                self._groups[key] = self.world.split(color=self.shape.group_colour(rank, *key),
                                                     key=self.shape.group_rank(rank, *key))
        return self._groups[key]

    # The pipeline's two ends, which hold the model's input and its loss.
    @property
    def is_first_stage(self):
        return self.coordinate("pp") == 0

    @property
    def is_last_stage(self):
        return self.coordinate("pp") == self.size("pp") - 1

    # Shorthands for the three axes every layout has (``mesh.dp`` is ``mesh.group("dp")``).
    dp = property(lambda self: self.group("dp"))
    tp = property(lambda self: self.group("tp"))
    pp = property(lambda self: self.group("pp"))
    dp_rank = property(lambda self: self.coordinate("dp"))
    tp_rank = property(lambda self: self.coordinate("tp"))
    pp_rank = property(lambda self: self.coordinate("pp"))

    @property
    def layout(self):
        """The dp x tp x pp ``Layout`` (checkpoint indexes record it)."""
        from minipar.parallel.topology import Layout

        return Layout(self.size("dp"), self.size("tp"), self.size("pp"))
