"""Bodies of tests/test_distributed_checkpoint.py, run on every rank by minipar.testing.run_on_ranks.

Resume equivalence: train n steps under layout A, save, load under layout B, train m more; the
result must equal n + m steps without interruption (float64). The uninterrupted reference is a
single-process Trainer (1 x 1 x 1) run on rank 0 over MPI.COMM_SELF; the equivalence tests show
every layout equals it. Values are compared after gathering the shards with
``Trainer.gather_state`` (minipar/parallel/gather.py), which does not use the checkpoint code.

Bad input: each body makes every rank try the same thing, catches the CheckpointError, and
checks (by allgather) that every rank raised the very same message -- a rank that hung instead
would leave the job to the harness's timeout, and a rank that did not raise fails the check.

Every body records its comparisons (tests/mpi_bodies/comparisons.py) and returns them to pytest.
"""
import json
import os
import shutil
from pathlib import Path

from mpi4py import MPI

from minipar.backend import host_rng, xp
from minipar.comm import Communicator
from minipar.errors import CheckpointError
from minipar.nn.gpt import GPTConfig
from minipar.parallel import distributed_checkpoint
from minipar.parallel.distributed_checkpoint import (
    load_distributed_checkpoint,
    load_single_process_model,
    save_distributed_checkpoint,
    trainer_pieces,
)
from minipar.train import TrainConfig, Trainer
from tests.mpi_bodies.comparisons import Comparisons

MODEL = dict(vocab_size=16, block_size=8, n_layer=4, n_head=4, n_embd=16, seed=3)
BATCH = 16
# Layout changes reorder sums, so values agree to rounding, as in tests/mpi_bodies/equivalence_body.py;
# parameters whose exact gradient is 0 (the key bias) drift by AdamW-amplified rounding noise.
RTOL, ATOL = 1e-10, 1e-11
PREFIXES = ("model", "optimizer/m", "optimizer/v")


def train_config(total_steps, **layout):
    return TrainConfig(steps=total_steps, batch_size=BATCH, dtype="float64", warmup_steps=2, learning_rate=1e-2,
                       grad_clip=1.0, **layout)


def batch(step):
    """The global batch of ``step``, the same on every rank."""
    generator = host_rng([11, step])
    ids = generator.integers(0, MODEL["vocab_size"], (BATCH, MODEL["block_size"] + 1))
    return xp.asarray(ids[:, :-1]), xp.asarray(ids[:, 1:])


def train(trainer, steps):
    return [trainer.train_step(*batch(trainer.step_count)) for _ in range(steps)]


def gathered(trainer):
    """On world rank 0: {"model/<name>" | "optimizer/m/<name>" | "optimizer/v/<name>": full array}."""
    pieces = trainer_pieces(trainer)
    state = {}
    for prefix in PREFIXES:
        if not any(key.startswith(prefix + "/") for key in pieces):
            continue
        full = trainer.gather_state({id(p): pieces[f"{prefix}/{p.shard.full_name}"][1] for p in trainer.parameters})
        state.update({f"{prefix}/{name}": value for name, value in (full or {}).items()})
    return state


def reference(total_steps, steps, model=None, microbatches=1):
    """Losses and gathered state of an uninterrupted single-process run of ``steps`` steps (``model``:
    GPTConfig fields replacing MODEL's; a mixture of experts routes each micro-batch as one group, so
    ``microbatches`` = the layouts' data ranks makes one process route as they do)."""
    trainer = Trainer(GPTConfig(**{**MODEL, **(model or {})}), train_config(total_steps, microbatches=microbatches),
                      Communicator(MPI.COMM_SELF))
    return train(trainer, steps), gathered(trainer)


def compare_states(compare, label, state, expected, exact=False):
    compare.value(f"{label}: names", sorted(state), sorted(expected))
    for key, value in expected.items():
        if key not in state:
            continue
        if exact:
            compare.arrays_equal(f"{label}: {key}", state[key], value)
        else:
            compare.arrays_close(f"{label}: {key}", state[key], value, rtol=RTOL, atol=ATOL)


def run_chain(comm, folder, segments, total_steps):
    """Each segment: a layout for this world, steps to train; load the previous checkpoint, save the next."""
    world, losses, compare = Communicator(comm), [], Comparisons()
    for number, segment in enumerate(segments):
        layout = dict(segment)
        steps = layout.pop("steps")
        trainer = Trainer(GPTConfig(**MODEL), train_config(total_steps, **layout), world)
        if number > 0:
            load_distributed_checkpoint(os.path.join(folder, f"after-{len(losses)}"), trainer)
            compare.value(f"segment {segment}: step after loading", trainer.step_count, len(losses))
        losses += train(trainer, steps)
        save_distributed_checkpoint(os.path.join(folder, f"after-{len(losses)}"), trainer)
        compare.checks.append(f"segment {number}")
    if world.rank == 0:
        Path(folder, "chain-losses.json").write_text(json.dumps(losses))
    return compare.report()


def finish_chain_single_process(comm, folder, steps, total_steps):
    """1 x 1 x 1: load the chain's last checkpoint, train the rest, compare with no interruption at all."""
    compare = Comparisons()
    compare.value("ranks", comm.size, 1)
    losses = json.loads(Path(folder, "chain-losses.json").read_text())
    path = os.path.join(folder, f"after-{len(losses)}")
    trainer = Trainer(GPTConfig(**MODEL), train_config(total_steps), Communicator(comm))
    load_distributed_checkpoint(path, trainer)
    model, index = load_single_process_model(path)  # what `sample` uses: the same values
    compare.value("index (step, layout)", [index["step"], index["layout"]], [len(losses), {"dp": 8, "tp": 1, "pp": 1}])
    state = gathered(trainer)
    for name, value in model.state_dict().items():
        compare.arrays_equal(f"single-process model against the Trainer: {name}", value, state[f"model/{name}"])
    losses += train(trainer, steps)
    expected_losses, expected_state = reference(total_steps, len(losses))
    compare.arrays_close("losses of the whole chain", losses, expected_losses, rtol=1e-11)
    compare_states(compare, "chain", gathered(trainer), expected_state)
    compare.checks.append(f"chain of {len(losses)} steps")
    return compare.report()


def resume_cases(comm, folder, cases, total_steps, model=None, reference_microbatches=1):
    """Each case: layout A, layout B, n, m. Same layout: bit for bit equal; otherwise to rounding.
    ``model``, ``reference_microbatches``: as for ``reference``."""
    world, compare = Communicator(comm), Comparisons()
    model_config = GPTConfig(**{**MODEL, **(model or {})})
    for number, (layout_a, layout_b, steps_before, steps_after) in enumerate(cases):
        path = os.path.join(folder, f"case-{number}")
        first = Trainer(model_config, train_config(total_steps, **layout_a), world)
        losses = train(first, steps_before)
        save_distributed_checkpoint(path, first)
        second = Trainer(model_config, train_config(total_steps, **layout_b), world)
        load_distributed_checkpoint(path, second)
        losses += train(second, steps_after)
        state = gathered(second)
        label = f"{layout_a} -> {layout_b}"
        if layout_a == layout_b:
            uninterrupted = Trainer(model_config, train_config(total_steps, **layout_b), world)
            expected_losses = train(uninterrupted, steps_before + steps_after)
            expected_state = gathered(uninterrupted)
            compare.value(f"{label}: losses (bit for bit)", losses, expected_losses)
        elif world.rank == 0:
            expected_losses, expected_state = reference(total_steps, steps_before + steps_after, model,
                                                        reference_microbatches)
            compare.arrays_close(f"{label}: losses", losses, expected_losses, rtol=1e-11)
        if world.rank == 0:
            compare_states(compare, label, state, expected_state, exact=layout_a == layout_b)
        compare.checks.append(label)
    compare.value("ranks", world.size, 4)  # every rank compares something
    return compare.report()


# ---- failures ------------------------------------------------------------------------------------
def expect_same_error_everywhere(compare, what, comm, action, *fragments):
    """Run ``action``; every rank must raise a CheckpointError, the same one, containing ``fragments``."""
    try:
        action()
    except CheckpointError as error:
        message = str(error)
    else:
        message = None
    messages = comm.allgather(message)  # small metadata: pickle is fine
    compare.value(f"{what}: ranks that raised no CheckpointError", [r for r, m in enumerate(messages) if m is None], [])
    compare.value(f"{what}: different messages across ranks", len(set(messages)), 1)
    compare.value(f"{what}: phrases missing from the message {message!r}",
                  [fragment for fragment in fragments if fragment not in (message or "")], [])
    return message


def snapshot(folder):
    """Every file's bytes under a checkpoint folder (what must survive a failed save)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def failed_save_keeps_previous(comm, folder):
    world, compare = Communicator(comm), Comparisons()
    layout = dict(tp=2, pp=2, microbatches=2)  # all four ranks write a file
    trainer = Trainer(GPTConfig(**MODEL), train_config(4, **layout), world)
    path = Path(folder, "ckpt")
    train(trainer, 1)
    save_distributed_checkpoint(path, trainer)
    before = snapshot(path) if world.rank == 0 else None
    train(trainer, 1)
    real_write = distributed_checkpoint.write_array_file

    def write_half_then_fail(file_path, arrays, metadata=None):
        Path(file_path).write_bytes(b"PK\x03\x04 half a shard")  # a partial file, then the disk is full
        raise OSError(28, "No space left on device (simulated)")

    if world.rank == 1:
        distributed_checkpoint.write_array_file = write_half_then_fail
    expect_same_error_everywhere(compare, "full disk on rank 1", comm,
                                 lambda: save_distributed_checkpoint(path, trainer),
                                 "failed on rank 1", "No space left on device", "previous checkpoint")
    distributed_checkpoint.write_array_file = real_write
    if world.rank == 0:
        compare.true("a failed save left the previous checkpoint's bytes as they were", snapshot(path) == before)
        compare.value("files beside the checkpoint after a failed save",
                      sorted(p.name for p in Path(folder).iterdir()), ["ckpt"])
    comm.Barrier()
    # The previous checkpoint is complete: it loads and holds step 1.
    restored = Trainer(GPTConfig(**MODEL), train_config(4, **layout), world)
    compare.value("step of the previous checkpoint, loaded", load_distributed_checkpoint(path, restored)["step"], 1)

    real_index_writer = distributed_checkpoint.write_json_atomic
    if world.rank == 0:
        def no_index(file_path, value):
            raise OSError(5, "Input/output error (simulated)")
        distributed_checkpoint.write_json_atomic = no_index
    expect_same_error_everywhere(compare, "index write failing on rank 0", comm,
                                 lambda: save_distributed_checkpoint(path, trainer),
                                 "failed on rank 0", "Input/output error")
    distributed_checkpoint.write_json_atomic = real_index_writer
    if world.rank == 0:
        compare.true("a failed index write left the previous checkpoint's bytes as they were", snapshot(path) == before)
        compare.value("files beside the checkpoint after a failed index write", sorted(os.listdir(folder)), ["ckpt"])

    save_distributed_checkpoint(path, trainer)  # a save that works replaces the old checkpoint
    if world.rank == 0:
        compare.value("files after a save that works", sorted(os.listdir(folder)), ["ckpt"])
        compare.true("a save that works replaced the checkpoint", snapshot(path) != before)
    other_layout = Trainer(GPTConfig(**MODEL), train_config(4, dp=4), world)
    compare.value("step of the new checkpoint, loaded under dp 4",
                  load_distributed_checkpoint(path, other_layout)["step"], 2)
    expected, state = gathered(trainer), gathered(other_layout)
    if world.rank == 0:
        compare_states(compare, "after overwrite", state, expected, exact=True)  # moved, not recomputed
    compare.checks.append("atomic save")
    return compare.report()


def corrupt_checkpoints(comm, folder):
    world, compare = Communicator(comm), Comparisons()
    layout = dict(tp=2, pp=2, microbatches=2)  # loading under the same layout: rank r reads its own file
    trainer = Trainer(GPTConfig(**MODEL), train_config(4, **layout), world)
    train(trainer, 1)
    pristine, later = Path(folder, "pristine"), Path(folder, "later")
    save_distributed_checkpoint(pristine, trainer)
    train(trainer, 1)
    save_distributed_checkpoint(later, trainer)

    def case(name, damage, *fragments, model=MODEL):
        broken = Path(folder, name)
        if world.rank == 0:
            shutil.copytree(pristine, broken)
            damage(broken)
        comm.Barrier()
        fresh = Trainer(GPTConfig(**model), train_config(4, **layout), world)
        expect_same_error_everywhere(compare, name, comm, lambda: load_distributed_checkpoint(broken, fresh),
                                     *fragments)
        compare.checks.append(name)

    def flip_byte(broken):
        shard = broken / "shard-rank-00003.minipar"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))

    def truncate(broken):
        shard = broken / "shard-rank-00002.minipar"
        shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])

    def swap_in_other_file(broken):
        shutil.copy(later / "shard-rank-00003.minipar", broken / "shard-rank-00003.minipar")

    def drop_a_piece(broken):
        index = json.loads((broken / "index.json").read_text())
        index["arrays"]["model/blocks.0.mlp.hidden.weight"]["shards"].pop()
        (broken / "index.json").write_text(json.dumps(index))

    case("flipped", flip_byte, "failed on rank 3", "checksum mismatch", "shard-rank-00003")
    # Found by rank 0 from the file's size alone, before any rank reads it (nothing allocated for it).
    case("truncated", truncate, "truncated", "shard-rank-00002", "fewer than")
    case("swapped", swap_in_other_file, "failed on rank 3", "does not hold", "another checkpoint")
    case("missing-shard", lambda broken: (broken / "shard-rank-00001.minipar").unlink(),
         "shard file 'shard-rank-00001.minipar' is missing")
    case("missing-index", lambda broken: (broken / "index.json").unlink(), "no file at", "index.json")
    case("missing-folder", shutil.rmtree, "no checkpoint folder at")
    case("untiled", drop_a_piece, "pieces of 'model/blocks.0.mlp.hidden.weight' do not tile it")
    case("other-shape", lambda broken: None, "another model shape", "n_embd=16", "n_embd=32",
         model={**MODEL, "n_embd": 32})
    # After all that, nothing is out of step: the pristine checkpoint loads under another layout.
    survivor = Trainer(GPTConfig(**MODEL), train_config(4, dp=2, tp=2, sequence_parallel=True), world)
    compare.value("step of the pristine checkpoint, loaded after all that",
                  load_distributed_checkpoint(pristine, survivor)["step"], 1)
    return compare.report()


def checkpoint_before_mesh_loads(comm, fixture, layout):
    """The checkpoint written by the code from before the device mesh (tests/fixtures/) loads under
    ``layout``, and the third step's loss and parameters equal what that code computed."""
    world, compare = Communicator(comm), Comparisons()
    compare.checks.append("checkpoint before the mesh")
    expected = json.loads(Path(fixture, "checkpoint_before_mesh.json").read_text())
    config = TrainConfig(steps=4, batch_size=8, dtype="float64", warmup_steps=1, learning_rate=1e-2, **layout)
    trainer = Trainer(GPTConfig(**expected["model"]), config, world)
    info = load_distributed_checkpoint(os.path.join(fixture, "checkpoint_before_mesh.minipar"), trainer)
    compare.value("step loaded", info["step"], 2)
    ids = host_rng([11, 2]).integers(0, expected["model"]["vocab_size"], (8, expected["model"]["block_size"] + 1))
    loss = trainer.train_step(xp.asarray(ids[:, :-1]), xp.asarray(ids[:, 1:]))
    compare.arrays_close("loss of step 2", xp.asarray([loss]), xp.asarray([expected["loss_of_step_2"]]), rtol=1e-11)
    state = trainer.gather_state()
    if state is not None:
        names = sorted(expected["sum_of_squares_after_step_2"])
        compare.value("parameter names", sorted(state), names)
        compare.arrays_close("sum of squares of every parameter after step 2",
                             xp.asarray([float((state[n] ** 2).sum()) for n in names]),
                             xp.asarray([expected["sum_of_squares_after_step_2"][n] for n in names]), rtol=1e-11)
    return compare.report()
