"""A distributed checkpoint's index, and reading any layout's slices through it.

The index, ``index.json`` in the checkpoint folder (minipar/parallel/distributed_checkpoint.py writes
the folder), holds the configs, step, tokenizer and layout, and for every full array which file holds
which slice (Shard fields, shapes, dtypes, SHA-256). ``check_index`` refuses an index whose pieces do
not tile every array exactly, whose file names leave the folder, or whose declared pieces need
more bytes than their files hold (so nothing is allocated for a crafted index); saving runs the
same check, so such an index is never written.

Resharding: a saved piece is ``saved.take(full)`` and a rank of the new layout needs
``mine.take(full)``, so it reads the pieces' files, rebuilds ``full = saved.join(pieces)`` and keeps
``mine.take(full)`` -- or, when one saved piece already is its slice, reads only that file.

Nothing here knows the Trainer: ``read_arrays`` takes {key: (Shard, full shape)}, so a trainer of any
layout and a single process (every Shard replicated) read alike. Rank 0 checks the index and
broadcasts it; each rank reads what it needs, and an allgather of every rank's error makes all raise
the same CheckpointError, naming the rank.
"""
from pathlib import Path

import numpy  # dtypes of the index's records, on the host

from minipar.backend import to_host
from minipar.checkpoint import read_array_file, read_json, sha256_of
from minipar.errors import CheckpointError
from minipar.parallel.sharding import Shard

FORMAT_NAME = "minipar-distributed-checkpoint"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SLICING_FIELDS = ("axis", "index", "count", "blocks")  # a Shard without its name
# The GPTConfig fields that fix the parameters' shapes and meaning (dropout and seed do not).
MODEL_SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "n_experts")
SAVED_BEFORE = {"n_experts": 0}  # what an index written before a field existed means by its absence


def raise_on_every_rank(message):
    """Raise a CheckpointError that every rank raises alike (it arrived through a collective)."""
    error = CheckpointError(message)
    error.on_every_rank = True  # minipar.job: no abort needed, rank 0 says it
    raise error


def describe_failure(failure):
    """A CheckpointError's own sentence (it names the file); anything else with its type."""
    return str(failure) if isinstance(failure, CheckpointError) else f"{type(failure).__name__}: {failure}"


def slicing_of(shard_or_record):
    """(axis, index, count, blocks) of a Shard or of an index record."""
    if isinstance(shard_or_record, Shard):
        return tuple(getattr(shard_or_record, field) for field in SLICING_FIELDS)
    return tuple(shard_or_record[field] for field in SLICING_FIELDS)


# ---- the index -------------------------------------------------------------------------------
def check_index(index, folder):
    """Raise CheckpointError unless the index is well formed and its pieces tile every array exactly."""
    try:
        if not isinstance(index["step"], int) or index["step"] < 0 or not isinstance(index["model_config"], dict):
            raise CheckpointError(f"step {index['step']!r} or model config {index['model_config']!r} is invalid")
        sizes, declared = {}, {}
        for name in index["files"]:
            if Path(name).name != name or name.startswith(".") or "\\" in name:
                raise CheckpointError(f"shard file name {name!r} is not a plain file name (it would escape the folder)")
            where = Path(folder) / name
            if not where.is_file():
                raise CheckpointError(f"shard file {name!r} is missing")
            if where.is_symlink() or where.resolve().parent != Path(folder).resolve():
                raise CheckpointError(f"shard file {name!r} is a link out of the checkpoint's folder")
            sizes[name], declared[name] = where.stat().st_size, 0
        for key, entry in index["arrays"].items():
            records, full_shape = entry["shards"], list(entry["shape"])
            first = Shard(key, *slicing_of(records[0]))
            expected = [0] if first.is_replicated else list(range(first.count))
            slicings = {tuple(record[field] for field in ("axis", "count", "blocks")) for record in records}
            if [record["index"] for record in records] != expected or len(slicings) != 1:
                raise CheckpointError(f"the pieces of {key!r} do not tile it: {[r['index'] for r in records]}")
            piece_shape = list(full_shape)
            if not first.is_replicated:
                if full_shape[first.axis] % (first.count * first.blocks):
                    raise CheckpointError(f"{key!r} of shape {full_shape} cannot be split as {first}")
                piece_shape[first.axis] //= first.count
            for record in records:
                if record["file"] not in index["files"] or list(record["shape"]) != piece_shape:
                    raise CheckpointError(f"piece {record['index']} of {key!r} has an unknown file or shape "
                                          f"{record['shape']} (expected {piece_shape})")
                declared[record["file"]] += _bytes_of(record)
        for name, size in sizes.items():  # before anything is allocated for them
            if declared[name] > size:
                raise CheckpointError(f"shard file {name!r} holds {size:,} bytes, fewer than the {declared[name]:,} "
                                      "bytes of arrays the index declares in it (truncated, or not this index's file)")
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, ZeroDivisionError) as failure:
        raise CheckpointError(f"malformed index ({type(failure).__name__}: {failure})") from None


def _bytes_of(record):
    """Bytes of one piece as the index declares it (a numeric dtype, a shape of non-negative ints)."""
    dtype = numpy.dtype(record["dtype"])
    if dtype.kind not in "biufc" or not all(isinstance(n, int) and n >= 0 for n in record["shape"]):
        raise CheckpointError(f"a piece has dtype {record['dtype']!r} and shape {record['shape']!r}")
    count = 1
    for n in record["shape"]:
        count *= n
    return count * dtype.itemsize


def check_model_backed(index):
    """The saved model config agrees with the arrays the index declares (which its files back):
    a crafted config cannot make a loader build a model larger than the checkpoint."""
    config, arrays = index["model_config"], index["arrays"]
    try:
        expected = {"model/embedding.token.weight": [config["vocab_size"], config["n_embd"]],
                    "model/embedding.position.weight": [config["block_size"], config["n_embd"]]}
        layers = {key.split(".")[1] for key in arrays if key.startswith("model/blocks.")}
        for key, shape in expected.items():
            if key not in arrays or list(arrays[key]["shape"]) != shape:
                raise CheckpointError(f"its model config says {key[len('model/'):]} is {shape}, its arrays "
                                      f"say {arrays.get(key, {}).get('shape')}")
        if layers != {str(n) for n in range(config["n_layer"])}:
            raise CheckpointError(f"its model config says {config['n_layer']} layers, its arrays hold {len(layers)}")
    except (KeyError, TypeError, AttributeError) as failure:
        raise CheckpointError(f"malformed model config ({type(failure).__name__}: {failure})") from None


def check_model_matches(index, model_config):
    saved, current = index["model_config"], model_config.to_dict()
    saved = {**SAVED_BEFORE, **saved}
    differences = [f"{field} {saved.get(field)!r} != {current[field]!r}" for field in MODEL_SHAPE_FIELDS
                   if saved.get(field) != current[field]]
    if differences:
        def describe(config):
            return "GPTConfig(" + ", ".join(f"{field}={config.get(field)!r}" for field in MODEL_SHAPE_FIELDS) + ")"

        raise CheckpointError(f"saved from another model shape, {describe(saved)}; this run builds "
                              f"{describe(current)} ({'; '.join(differences)})")


def read_index_here(folder, model_config):
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(f"{str(folder)!r} is a file; a minipar checkpoint is a folder holding {INDEX_NAME}")
    if not folder.is_dir():
        leftovers = sorted(str(p) for p in folder.parent.glob(f".{folder.name}.old-*"))
        hint = (f"; a save was interrupted mid-swap and left the previous checkpoint at {leftovers[-1]!r}: "
                f"rename it to {str(folder)!r} to use it") if leftovers else ""
        raise CheckpointError(f"no checkpoint folder at {str(folder)!r}{hint}")
    index = read_json(folder / INDEX_NAME)
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{str(folder / INDEX_NAME)!r} is not a minipar distributed checkpoint index")
    if index.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(folder)!r} has format version {index.get('version')!r}; "
                              f"this minipar reads version {FORMAT_VERSION}")
    try:
        check_index(index, folder)
        check_model_backed(index)
        if model_config is not None:
            check_model_matches(index, model_config)
    except CheckpointError as failure:
        raise CheckpointError(f"checkpoint {str(folder)!r}: {failure}") from None
    return index


def read_index(folder, world=None, model_config=None):
    """The checked index, read by rank 0 and broadcast (an error is raised alike on every rank)."""
    error, index = None, None
    if world is None or world.rank == 0:
        try:
            index = read_index_here(folder, model_config)
        except Exception as failure:  # noqa: BLE001 - no communication in there; raised below on every rank
            error = describe_failure(failure)
    if world is not None and world.size > 1:
        error, index = world.mpi.bcast((error, index), root=0)
    if error:
        raise_on_every_rank(error)
    return index


# ---- reading any layout's slices -------------------------------------------------------------
def _records_needed(folder, index, key, shard, full_shape):
    entry = index["arrays"].get(key)
    if entry is None:
        raise CheckpointError(f"checkpoint {str(folder)!r} has no array {key!r}")
    if list(entry["shape"]) != list(full_shape):
        raise CheckpointError(f"checkpoint {str(folder)!r}: {key!r} has shape {tuple(entry['shape'])}, "
                              f"this model needs {tuple(full_shape)}")
    exact = [record for record in entry["shards"] if slicing_of(record) == slicing_of(shard)]
    return exact or entry["shards"]  # the one piece that already is my slice, or all of them


def read_arrays(folder, index, wanted, world=None):
    """{key: this rank's slice} for ``wanted`` = {key: (Shard, full shape)}, reading only the files needed."""
    folder, error, result = Path(folder), None, {}
    try:
        plans = {key: _records_needed(folder, index, key, *request) for key, request in wanted.items()}
        files = {}
        for records in plans.values():
            for record in records:
                if record["file"] not in files:
                    files[record["file"]] = read_array_file(folder / record["file"])[0]
        for key, (shard, _) in wanted.items():
            parts = [files[record["file"]].get(key) for record in plans[key]]
            for record, part in zip(plans[key], parts):
                if part is None or list(part.shape) != record["shape"] or sha256_of(to_host(part)) != record["sha256"]:
                    raise CheckpointError(f"{str(folder / record['file'])!r} does not hold the {key!r} that the "
                                          "index describes (a file from another checkpoint?)")
            saved = Shard(key, *slicing_of(plans[key][0]))
            result[key] = parts[0] if slicing_of(saved) == slicing_of(shard) else shard.take(saved.join(parts))
    except Exception as failure:  # noqa: BLE001 - file reads only; raised below on every rank
        error = describe_failure(failure)
    errors = world.mpi.allgather(error) if world is not None and world.size > 1 else [error]
    failed = [rank for rank, message in enumerate(errors) if message]
    if failed:
        others = f" (ranks {failed} failed)" if len(failed) > 1 else ""
        raise_on_every_rank(f"loading failed on rank {failed[0]}{others}: {errors[failed[0]]}")
    return result
