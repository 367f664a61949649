"""Distributed checkpoints: every rank writes its own shards, and any layout can load them.

    ckpt.minipar/                 a checkpoint is a folder
      index.json                  rank 0: configs, step, tokenizer, layout, and for every full array
                                  which file holds which slice (Shard fields, shapes, dtypes, SHA-256)
      shard-rank-00000.minipar    one minipar.checkpoint array file per writing rank
      shard-rank-00001.minipar    (atomic, checksummed, never pickled)

Keys: ``model/<full name>``, ``optimizer/m/<full name>``, ``optimizer/v/<full name>`` (AdamW's
moments share their parameter's Shard). Each piece, a (key, shard index) pair, is written once, by
the lowest world rank holding it: data-parallel replica 0, tensor rank 0 for replicated
parameters, the first stage for the tied embedding.

Saving is atomic at the folder level: every file goes into a temporary sibling folder; gathering
every rank's result on rank 0 is the barrier; only if all succeeded does rank 0 write the index
and rename the folder into place (rename(2) is atomic, POSIX.1-2017), renaming an old checkpoint
aside first and deleting it last. Loading: rank 0 checks the index and broadcasts it; each rank
reads what it needs. In both, any rank's failure reaches every rank (a broadcast or an
allgather of the message), so all raise the same CheckpointError, naming the rank, and none
waits for a partner that gave up. docs/checkpoints.md has the format and the crash windows.

The index (its format, its checks) and reading any layout's slices through it, resharding on the
way, are minipar/parallel/checkpoint_index.py; this module is what a Trainer saves and loads.
"""
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy

from minipar.backend import to_host, xp
from minipar.checkpoint import default_mode, read_json, sha256_of, write_array_file, write_json_atomic
from minipar.errors import CheckpointError, ConfigError
from minipar.parallel.checkpoint_index import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    SLICING_FIELDS,
    check_index,
    describe_failure,
    raise_on_every_rank,
    read_arrays,
    read_index,
    slicing_of,
)
from minipar.parallel.sharding import Shard, label_replicated


def kept_name(path, step):
    """Where an older checkpoint is kept: ``ckpt.minipar`` at step 500 -> ``ckpt-step-000500.minipar``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-step-{step:06d}{path.suffix}")


def kept_checkpoints(path):
    """The older checkpoints kept beside ``path``, oldest first, as (step, folder)."""
    path = Path(path)
    pattern = re.compile(re.escape(path.stem) + r"-step-(\d+)" + re.escape(path.suffix) + "$")
    found = [(int(match.group(1)), entry) for entry in (path.parent.iterdir() if path.parent.is_dir() else [])
             for match in [pattern.match(entry.name)] if match and entry.is_dir()]
    return sorted(found)


def shard_file_name(rank):
    return f"shard-rank-{rank:05d}.minipar"


# ---- what this rank holds --------------------------------------------------------------------
def trainer_pieces(trainer):
    """{key: (Shard, array)}: this rank's parameters and AdamW moments, each its tensor-parallel shard.

    Collective under ZeRO (the Trainer all-gathers the dp-sharded parts), so every rank calls it.
    """
    shards = {name: p.shard for name, p in trainer.named_parameters}
    pieces = {f"model/{name}": (shards[name], array) for name, array in trainer.parameter_arrays().items()}
    for name, slots in trainer.optimizer_state_arrays().items():
        for slot in ("m", "v"):
            pieces[f"optimizer/{slot}/{name}"] = (shards[name], slots[slot])
    rank = trainer.grid.world.rank
    for name, array in trainer.sync_state_arrays().items():  # this rank's alone: its own key
        pieces[f"{_sync_prefix(rank)}{name}"] = (Shard(name), array)
    return pieces


def _sync_prefix(rank):
    """Keys of state only one rank holds (compression residuals, local SGD's replica): by world rank."""
    return f"sync/rank-{rank:05d}/"


def _full_shape(shard, local_shape):
    shape = list(local_shape)
    if not shard.is_replicated:
        shape[shard.axis] *= shard.count
    return shape


# ---- saving ----------------------------------------------------------------------------------
def save_distributed_checkpoint(path, trainer, tokenizer=None, extra=None, keep=1):
    """Every rank calls this (see the module docstring); ``tokenizer`` is a JSON dict for ``sample``.

    ``extra``: more JSON for the index (the CLI stores the loss history). ``keep``: how many
    checkpoints to keep; the one at ``path`` is always the newest, and with ``keep`` > 1 the one it
    replaces is renamed to ``kept_name(path, its step)`` instead of deleted, the oldest pruned.
    Arrays that are not finite (a diverged run) are refused: a NaN checkpoint is never written.
    """
    world, path = trainer.grid.world, Path(os.path.abspath(path))
    pieces = trainer_pieces(trainer)
    # Who writes what: the lowest rank holding each piece. Small metadata, so a pickled allgather.
    owner = {}
    for rank, held in enumerate(world.mpi.allgather([(key, shard.index) for key, (shard, _) in pieces.items()])):
        for piece in held:
            owner.setdefault(piece, rank)
    mine = [key for key, (shard, _) in pieces.items() if owner[(key, shard.index)] == world.rank]

    error, temporary = None, None
    if world.rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(path)
            temporary = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-")
            os.chmod(temporary, default_mode(folder=True))  # mkdtemp's 0700 would hide it from the user's group
        except OSError as failure:
            error = f"saving checkpoint {str(path)!r} failed on rank 0: {failure}"
    error, temporary = world.mpi.bcast((error, temporary), root=0)
    if error:
        raise_on_every_rank(error)

    error, records, file_name = None, {}, shard_file_name(world.rank)
    try:  # local file writes only, no communication in here: a failure cannot strand a partner
        if mine:
            arrays = {key: to_host(xp.ascontiguousarray(pieces[key][1])) for key in mine}
            bad = [key for key, array in arrays.items() if not numpy.isfinite(array).all()]
            if bad:
                raise CheckpointError(f"{len(bad)} arrays hold NaN or infinite values (first: {bad[0]!r}); "
                                      "a diverged model is not saved")
            write_array_file(Path(temporary) / file_name, arrays)
            records = {key: {"file": file_name, **dict(zip(SLICING_FIELDS, slicing_of(pieces[key][0]))),
                             "shape": list(array.shape), "dtype": array.dtype.str, "sha256": sha256_of(array)}
                       for key, array in arrays.items()}
    except Exception as failure:  # noqa: BLE001 - not swallowed: every rank raises it below
        error = describe_failure(failure)
    reports = world.mpi.gather((error, records), root=0)  # the barrier: every rank is done writing
    outcome = None
    if world.rank == 0:
        index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": trainer.step_count,
                 "model_config": trainer.model_config.to_dict(), "train_config": trainer.config.to_dict(),
                 "tokenizer": tokenizer, "layout": layout_record(trainer.grid.shape),
                 **(extra or {}), "files": {}, "arrays": {}}
        try:  # again no communication: whatever happens here reaches every rank through the broadcast
            outcome = _finish_save(path, Path(temporary), reports, index, trainer.grid.shape, keep)
        except Exception as failure:  # noqa: BLE001 - raised below on every rank
            shutil.rmtree(temporary, ignore_errors=True)
            outcome = f"saving checkpoint {str(path)!r} failed on rank 0: {describe_failure(failure)}"
    outcome = world.mpi.bcast(outcome, root=0)
    if outcome:
        raise_on_every_rank(outcome)


def _remove_leftovers(path):
    """On rank 0 before a save: delete what interrupted saves left beside ``path`` (see docs/checkpoints.md).

    ``.partial-`` folders are never read; ``.old-`` ones only while nothing is at ``path`` (then the
    old checkpoint waits there to be renamed back, and is kept).
    """
    for leftover in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if path.is_dir():
        for leftover in path.parent.glob(f".{path.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def layout_record(shape):
    """The index's "layout": dp, tp and pp, and ep and cp where they are used (a MeshShape)."""
    return {axis: shape.size(axis) for axis in ("dp", "tp", "pp", "ep", "cp")
            if axis in ("dp", "tp", "pp") or shape.size(axis) > 1}


def _finish_save(path, temporary, reports, index, shape, keep=1):
    """On rank 0: fill in the index, write it, swap the folder into place; an error message or None."""
    failed = [rank for rank, (error, _) in enumerate(reports) if error]
    if failed:
        shutil.rmtree(temporary, ignore_errors=True)
        return (f"saving checkpoint {str(path)!r} failed on rank {failed[0]}"
                + (f" (ranks {failed} failed)" if len(failed) > 1 else "")
                + f": {reports[failed[0]][0]}; the previous checkpoint, if any, is untouched")
    for rank, (_, records) in enumerate(reports):
        for key, record in records.items():
            coordinates = {f"{axis}_rank": shape.coordinates(rank)[axis] for axis in layout_record(shape)}
            index["files"].setdefault(record["file"], {"rank": rank, **coordinates})
            full_shape = _full_shape(Shard(key, *slicing_of(record)), record["shape"])
            index["arrays"].setdefault(key, {"shape": full_shape, "dtype": record["dtype"], "shards": []})
            index["arrays"][key]["shards"].append(record)
    for entry in index["arrays"].values():
        entry["shards"].sort(key=lambda record: record["index"])
    check_index(index, temporary)  # a layout whose pieces do not tile every array is a bug: never save it
    write_json_atomic(temporary / INDEX_NAME, index)
    _swap_into_place(temporary, path, keep)
    return None


def _step_of(folder):
    try:
        step = read_json(Path(folder) / INDEX_NAME)["step"]
        return step if isinstance(step, int) and step >= 0 else None
    except (CheckpointError, KeyError, TypeError):
        return None


def _swap_into_place(new, path, keep=1):
    """Rename ``new`` to ``path``; an old checkpoint there is renamed aside first and deleted last
    (or, with ``keep`` > 1, kept under its step's name; the oldest kept ones beyond ``keep`` pruned)."""
    aside = None
    if path.exists() or path.is_symlink():
        aside = path.with_name(f".{path.name}.old-{new.name.rsplit('-', 1)[-1]}")
        os.rename(path, aside)  # a crash from here to the next rename leaves no `path`, both copies beside it
    try:
        os.rename(new, path)
    except OSError:
        if aside is not None:
            os.rename(aside, path)  # put the old one back
        raise
    _fsync_folder(path.parent)  # make the renames themselves durable
    step = _step_of(aside) if aside is not None and keep > 1 and aside.is_dir() else None
    if step is not None and not kept_name(path, step).exists():
        os.rename(aside, kept_name(path, step))
        aside = None
    if keep > 1:
        for _, older in kept_checkpoints(path)[:-(keep - 1)]:
            shutil.rmtree(older, ignore_errors=True)
    if aside is not None:  # the new checkpoint is in place: failing to delete the old one is only litter
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:  # a link, or the single-file checkpoint of an older minipar
            aside.unlink(missing_ok=True)


def _fsync_folder(folder):
    try:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        pass  # some file systems cannot sync a folder; the renames still happened


# ---- loading ---------------------------------------------------------------------------------
def load_distributed_checkpoint(path, trainer):
    """Load a checkpoint saved under any layout into this trainer's layout; returns the index."""
    world = trainer.grid.world
    index = read_index(path, world, trainer.model_config)
    shards = {name: p.shard for name, p in trainer.named_parameters}
    full_shapes = {name: _full_shape(shards[name], array.shape) for name, array in trainer.parameter_arrays().items()}
    wanted = {f"{prefix}/{name}": (shards[name], shape)
              for name, shape in full_shapes.items() for prefix in ("model", "optimizer/m", "optimizer/v")}
    arrays = read_arrays(path, index, wanted, world)
    trainer.load_parameter_arrays({name: arrays[f"model/{name}"] for name in full_shapes})
    trainer.load_optimizer_state_arrays({name: {slot: arrays[f"optimizer/{slot}/{name}"] for slot in ("m", "v")}
                                         for name in full_shapes}, index["step"])
    _load_sync_state(path, index, trainer)
    return index


def _load_sync_state(path, index, trainer):
    """Per-rank state (``Trainer.sync_state_arrays``) comes back only under the layout that saved it;
    under another one the residuals restart from zero, and rank 0 says so."""
    grid = trainer.grid
    saved = [key for key in index["arrays"] if key.startswith("sync/")]
    same_layout = index["layout"] == layout_record(grid.shape)
    if not same_layout:
        if saved and grid.world.rank == 0:
            print("note: this checkpoint holds per-rank state (compression residuals or local SGD replicas) "
                  "saved under another layout; it restarts from zero here, so the resumed run is not exact",
                  flush=True)
        saved = []
    prefix = _sync_prefix(grid.world.rank)
    wanted = {key: (Shard(key[len(prefix):]), index["arrays"][key]["shape"])
              for key in saved if key.startswith(prefix)}
    arrays = read_arrays(path, index, wanted, grid.world) if saved else {}
    trainer.load_sync_state_arrays({key[len(prefix):]: array for key, array in arrays.items()})


def load_single_process_model(path):
    """``(GPT, index)``: a distributed checkpoint loaded into one process, which is just one more layout."""
    from minipar.nn.gpt import GPT, GPTConfig

    index = read_index(path)
    try:
        config = GPTConfig.from_dict(index["model_config"])
    except (ConfigError, TypeError) as failure:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model config: {failure}") from None
    stored = {record["dtype"] for key, record in index["arrays"].items() if key.startswith("model/")}
    dtype = stored.pop() if len(stored) == 1 else None  # the float type it was trained in
    model = label_replicated(GPT(config, initialise=False, dtype=dtype))
    arrays = read_arrays(path, index, {f"model/{name}": (p.shard, p.shape) for name, p in model.named_parameters()})
    model.load_state_dict({key[len("model/"):]: value for key, value in arrays.items()})
    return model, index
