"""The corpus of exercise process_grid (The 3D grid: rank -> (dp, tp, pp) coordinates and the three sub-
communicators): wrong solutions that its checks must fail with the words of ``expect``, and correct
alternatives they must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import TOPOLOGY, Planted, region

WRONG = (
    Planted("process_grid", "data-parallel rank varies fastest", TOPOLOGY,
            "tp_rank = rank % self.tp\n        dp_rank = rank // self.tp % self.dp",
            "dp_rank = rank % self.dp\n        tp_rank = rank // self.dp % self.tp", "coordinates"),
    Planted("process_grid", "tensor- and data-parallel colours swapped", TOPOLOGY,
            "self.tp = world.split(color=self.dp_rank + layout.dp * self.pp_rank, key=self.tp_rank)",
            "self.tp = world.split(color=self.tp_rank + layout.tp * self.pp_rank, key=self.tp_rank)",
            "grid.tp holds world ranks"),
    Planted("process_grid", "pipeline groups ignore the replica", TOPOLOGY,
            "self.pp = world.split(color=self.tp_rank + layout.tp * self.dp_rank, key=self.pp_rank)",
            "self.pp = world.split(color=self.tp_rank, key=self.pp_rank)", "grid.pp holds world ranks"),
    Planted("process_grid", "data-parallel groups ignore the stage", TOPOLOGY,
            "self.dp = world.split(color=self.tp_rank + layout.tp * self.pp_rank, key=self.dp_rank)",
            "self.dp = world.split(color=self.tp_rank, key=self.dp_rank)", "grid.dp holds world ranks"),
)

ALTERNATIVES = (
    region("process_grid", "coordinates by divmod", TOPOLOGY, {"Layout.coordinates": """
rest, tp_rank = divmod(rank, self.tp)
pp_rank, dp_rank = divmod(rest, self.dp)
return dp_rank, tp_rank, pp_rank
"""}, ""),
    region("process_grid", "each group's colour is its first member's world rank", TOPOLOGY,
           {"ProcessGrid.__init__": """
layout.validate(world.size)
self.layout, self.world = layout, world
self.dp_rank, self.tp_rank, self.pp_rank = layout.coordinates(world.rank)
self.tp = world.split(color=layout.rank_of(self.dp_rank, 0, self.pp_rank), key=self.tp_rank)
self.dp = world.split(color=layout.rank_of(0, self.tp_rank, self.pp_rank), key=self.dp_rank)
self.pp = world.split(color=layout.rank_of(self.dp_rank, self.tp_rank, 0), key=self.pp_rank)
"""}, ""),
)
