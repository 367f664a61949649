"""Gather a parallel model back into single-process form on world rank 0.

Each parameter knows which slice of which full parameter it holds (its ``Shard``), so
the ranks of data-parallel replica 0 and context-parallel rank 0 (one copy of every shard;
cp ranks hold whole parameters) send their arrays to rank 0, which joins the tensor- and
expert-parallel parts and collects the pipeline stages. The list of what is coming is small
metadata and goes by pickle; the arrays go by buffer ``Send``.
"""
from dataclasses import asdict

from minipar.backend import xp
from minipar.parallel.sharding import Shard

_METADATA_TAG, _ARRAY_TAG = 71, 72


def gather_full_arrays(parameters, arrays_by_parameter, grid):
    """{full name: array} on world rank 0, None elsewhere (see module docstring)."""
    world = grid.world
    def sends(coordinates):
        return coordinates["dp"] == 0 and coordinates["cp"] == 0

    senders = [r for r in range(world.size) if sends(grid.shape.coordinates(r))]
    # A replicated parameter is the same on every tensor- and expert-parallel rank: only their rank 0 sends it.
    replica = grid.coordinate("tp") == 0 and grid.coordinate("ep") == 0
    local = [(p.shard, arrays_by_parameter[id(p)]) for p in parameters
             if id(p) in arrays_by_parameter and not (p.shard.is_replicated and not replica)]
    if world.rank != 0:
        if sends(grid.coordinates):
            world.mpi.send([(asdict(shard), array.shape, array.dtype.str) for shard, array in local],
                           dest=0, tag=_METADATA_TAG)
            for _, array in local:
                world.send(xp.ascontiguousarray(array), dest=0, tag=_ARRAY_TAG)
        return None
    parts = {}  # full name -> {index: array}, plus the Shard that says how to join
    shards = {}
    for shard, array in local:
        parts.setdefault(shard.full_name, {})[shard.index] = array.copy()
        shards[shard.full_name] = shard
    for source in senders[1:]:
        for fields, shape, dtype in world.mpi.recv(source=source, tag=_METADATA_TAG):
            shard = Shard(**fields)
            buffer = xp.empty(shape, dtype=xp.dtype(dtype))
            world.recv(buffer, source=source, tag=_ARRAY_TAG)
            parts.setdefault(shard.full_name, {})[shard.index] = buffer
            shards[shard.full_name] = shard
    full = {}
    for name, by_index in parts.items():
        shard = shards[name]
        if sorted(by_index) != list(range(1 if shard.is_replicated else shard.count)):
            raise RuntimeError(f"gather: parameter {name!r} is missing shards; got indices {sorted(by_index)}")
        full[name] = shard.join([by_index[i] for i in sorted(by_index)])
    return full
