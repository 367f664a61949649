"""How a data-parallel rank gets its rows of the global batch.

Every rank builds the model from the same seed (and data parallelism broadcasts dp rank 0's copy
anyway). The batch for step $s$ is split one of two ways:

- ``local_slice``: every rank samples the same global batch from (seed, step) and keeps
  rows $[d·B/N, (d+1)·B/N)$ for dp rank $d$; no communication;
- ``scatter_batch``: only dp rank 0 samples; it Scatters the rows, shard $d$ to rank $d$.

Both give rank $d$ the same rows. With equal shards the mean of the shard means is the mean over
the whole batch (Goyal et al. 2017), which is why data parallelism averages the gradients.
The other axes that cut the batch (ep, cp: ``axes.py``) use ``local_slice`` too.
"""
from minipar.backend import xp
from minipar.errors import ConfigError


def local_slice(global_batch, dp_rank, dp):
    """Rows [d·B/N, (d+1)·B/N) of an array, or of each array in a tuple (inputs, targets)."""
    arrays = tuple(global_batch) if isinstance(global_batch, (tuple, list)) else (global_batch,)
    rows = arrays[0].shape[0]
    if any(a.shape[0] != rows for a in arrays):
        raise ConfigError(f"batch arrays disagree on the number of rows: {[a.shape[0] for a in arrays]}")
    if rows % dp:
        raise ConfigError(f"global batch {rows} is not divisible by dp = {dp}")
    share = rows // dp
    pieces = tuple(a[dp_rank * share:(dp_rank + 1) * share] for a in arrays)
    return pieces if isinstance(global_batch, (tuple, list)) else pieces[0]


def scatter_batch(global_inputs, global_targets, dp_comm):
    """dp rank 0 holds the global batch (others pass None); each rank gets its B/N rows.

    Only the shapes travel as pickled metadata (the others cannot know them); the rows
    themselves move with the communicator's scatter (MPI_Scatter) into preallocated buffers.
    """
    rank, size = dp_comm.rank, dp_comm.size
    metadata = None
    if rank == 0:  # a problem found on rank 0 travels as the metadata, so every rank raises it
        if global_inputs is None or global_targets is None:
            metadata = "scatter_batch: dp rank 0 must pass the global inputs and targets"
        else:
            metadata = [(a.shape, a.dtype.str) for a in (global_inputs, global_targets)]
    metadata = dp_comm.mpi.bcast(metadata, root=0)
    if isinstance(metadata, str):
        raise ConfigError(metadata)
    (inputs_shape, _), (targets_shape, _) = metadata
    if inputs_shape[0] != targets_shape[0]:
        raise ConfigError(f"inputs have {inputs_shape[0]} rows but targets have {targets_shape[0]}")
    if inputs_shape[0] % size:
        raise ConfigError(f"global batch {inputs_shape[0]} is not divisible by dp = {size}")
    shards = []
    for array, (shape, dtype) in zip((global_inputs, global_targets), metadata, strict=True):
        shard = xp.empty((shape[0] // size, *shape[1:]), dtype=dtype)
        dp_comm.scatter(xp.ascontiguousarray(array) if rank == 0 else None, shard, root=0)
        shards.append(shard)
    return tuple(shards)
