"""The process grid written out by hand for three axes: world = dp x tp x pp (the exercise).

This is the naive version of ``parallel/mesh.py``, which does the same for any named axes
(``DeviceMesh``; the Trainer uses that one): here each axis is spelled out, so a learner sees
the rank formula and the three splits before meeting the general mixed radix. Both give
every layout the same ranks and the same groups (tests/test_mesh.py checks it).

Rank layout (Megatron-LM's order, tensor-parallel fastest):

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

Ranks that differ only in tp_rank are adjacent (0,1 / 2,3 ...), so on a real cluster a
tensor-parallel group, which talks on every layer, sits inside one node on the fastest
links; the pipeline dimension, which talks least, varies slowest.

Each rank belongs to three groups:
  tp group: same (dp, pp), all tp ranks   -> allreduces inside every layer
  dp group: same (tp, pp), all dp ranks   -> gradient averaging once per step
  pp group: same (dp, tp), all pp stages  -> activations and gradients point to point
"""
from dataclasses import dataclass

from minipar.errors import ConfigError, require_positive_int


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):  # the one place a layout's sizes are checked (TrainConfig builds one too)
        for name in ("dp", "tp", "pp"):
            require_positive_int(name, getattr(self, name))

    @property
    def world_size(self):
        return self.dp * self.tp * self.pp

    def validate(self, world_size):
        """The layout against the ranks actually launched (its sizes were checked when it was made)."""
        if self.world_size != world_size:
            raise ConfigError(f"dp x tp x pp = {self.dp} x {self.tp} x {self.pp} = {self.world_size} "
                              f"does not equal the number of MPI ranks ({world_size}); "
                              f"launch with mpiexec -n {self.world_size} or change the layout")

    def coordinates(self, rank):
        """(dp_rank, tp_rank, pp_rank) of a world rank."""
        ### BEGIN SOLUTION
        tp_rank = rank % self.tp
        dp_rank = rank // self.tp % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return dp_rank, tp_rank, pp_rank
        ### END SOLUTION

    def rank_of(self, dp_rank, tp_rank, pp_rank):
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def group_ranks(self, rank, group):
        """World ranks in ``rank``'s group ("dp", "tp" or "pp"), in group-rank order."""
        dp_rank, tp_rank, pp_rank = self.coordinates(rank)
        if group == "tp":
            return [self.rank_of(dp_rank, t, pp_rank) for t in range(self.tp)]
        if group == "dp":
            return [self.rank_of(d, tp_rank, pp_rank) for d in range(self.dp)]
        if group == "pp":
            return [self.rank_of(dp_rank, tp_rank, p) for p in range(self.pp)]
        raise ValueError(f"group must be 'dp', 'tp' or 'pp', got {group!r}")

    @property
    def mesh_shape(self):
        """This layout as a ``MeshShape`` over the named axes (parallel/mesh.py); the other axes have size 1."""
        from minipar.parallel.mesh import MeshShape

        return MeshShape.of(dp=self.dp, tp=self.tp, pp=self.pp)

    def describe(self):
        """A text picture of the grid: one line per pipeline stage, a box per data-parallel replica."""
        return self.mesh_shape.describe()


class ProcessGrid:
    """A Layout bound to MPI: this rank's coordinates and its three group communicators."""

    def __init__(self, layout, world):
        """``world`` is a minipar Communicator over all ranks (see minipar.comm)."""
        ### BEGIN SOLUTION
        layout.validate(world.size)
        self.layout, self.world = layout, world
        self.dp_rank, self.tp_rank, self.pp_rank = layout.coordinates(world.rank)
        # Comm.Split puts ranks with the same colour in one group, ordered by key.
        self.tp = world.split(color=self.dp_rank + layout.dp * self.pp_rank, key=self.tp_rank)
        self.dp = world.split(color=self.tp_rank + layout.tp * self.pp_rank, key=self.dp_rank)
        self.pp = world.split(color=self.tp_rank + layout.tp * self.dp_rank, key=self.pp_rank)
        ### END SOLUTION

    @property
    def is_first_stage(self):
        return self.pp_rank == 0

    @property
    def is_last_stage(self):
        return self.pp_rank == self.layout.pp - 1
