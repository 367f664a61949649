"""Rank bodies for tests/test_communication_reduction.py at the Trainer level; they return values."""
import numpy as np

from minipar.backend import set_default_dtype, to_host, xp
from minipar.comm import Communicator
from minipar.nn.gpt import GPTConfig
from minipar.train import TrainConfig, Trainer

MODEL = dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)


def _batches(batch_size, steps, seed=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, MODEL["vocab_size"], (steps, batch_size, MODEL["block_size"] + 1))
    return [(xp.asarray(step[:, :-1]), xp.asarray(step[:, 1:])) for step in ids]


def _train(comm, steps, **options):
    """Losses, the gathered state (rank 0) and per-step parameter checksums of this rank."""
    set_default_dtype(xp.float64)
    world = Communicator(comm)
    config = TrainConfig(steps=steps, batch_size=16, dtype="float64", warmup_steps=1, learning_rate=0.05,
                         grad_clip=0.0, weight_decay=0.0, **options)
    trainer = Trainer(GPTConfig(**MODEL), config, world)
    losses, checksums = [], []
    for inputs, targets in _batches(config.batch_size, steps):
        losses.append(trainer.train_step(inputs, targets))
        checksums.append(float(sum(float(to_host(p.data).sum()) for p in trainer.parameters)))
    return trainer, losses, checksums


def local_sgd_h1_is_data_parallelism(comm, dp, steps=3, **layout):
    """Plain SGD: local SGD with H = 1 against data parallelism; both against every replica."""
    data_parallel, dp_losses, _ = _train(comm, steps, dp=dp, optimizer="sgd", **layout)
    dp_state = data_parallel.gather_state()
    trainer, local_losses, _ = _train(comm, steps, dp=dp, optimizer="sgd", local_sgd=1, **layout)
    local_state = trainer.gather_state()
    result = {"data_parallel_losses": dp_losses, "local_sgd_losses": local_losses}
    if comm.Get_rank() == 0:
        result["largest_relative_parameter_difference"] = max(
            float(np.abs(local_state[n] - dp_state[n]).max() / max(np.abs(dp_state[n]).max(), 1e-300))
            for n in dp_state)
    return result


def local_sgd_replicas_drift_and_meet(comm, period, steps):
    """Per step, this rank's parameter checksum: replicas differ between averages, agree after."""
    trainer, losses, checksums = _train(comm, steps, dp=comm.Get_size(), local_sgd=period)
    return {"checksums": checksums, "averaging_steps": [s for s in range(steps) if trainer.sync.is_averaging_step(s)],
            "allreduce_calls": trainer.grid.dp.counters["allreduce"].calls if "allreduce" in trainer.grid.dp.counters
            else 0}


def compressed_training(comm, method, steps=3):
    """Compressed against exact data parallelism: losses, replica checksums, bytes sent per step."""
    exact, exact_losses, _ = _train(comm, steps, dp=comm.Get_size())
    exact_bytes = sum(r.bytes_sent for r in exact.grid.dp.counters.values())
    trainer, losses, checksums = _train(comm, steps, dp=comm.Get_size(), compress=method, topk_ratio=0.1)
    sent = sum(r.bytes_sent for r in trainer.grid.dp.counters.values())
    return {"exact_losses": exact_losses, "losses": losses, "checksums": checksums,
            "bytes_sent": sent, "exact_bytes_sent": exact_bytes,
            "state_names": sorted(trainer.sync_state_arrays())}


def resume_is_exact(comm, folder, steps=6, split=3, **options):
    """Losses of an uninterrupted run against one saved after ``split`` steps and resumed in a new Trainer."""
    from minipar.parallel.distributed_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint

    _, straight, _ = _train(comm, steps, **options)
    set_default_dtype(xp.float64)
    world = Communicator(comm)
    config = TrainConfig(steps=steps, batch_size=16, dtype="float64", warmup_steps=1, learning_rate=0.05,
                         grad_clip=0.0, weight_decay=0.0, **options)
    data = _batches(config.batch_size, steps)
    first = Trainer(GPTConfig(**MODEL), config, world)
    pieces = [first.train_step(*batch) for batch in data[:split]]
    save_distributed_checkpoint(folder, first, keep=1)
    second = Trainer(GPTConfig(**MODEL), config, world)
    load_distributed_checkpoint(folder, second)
    pieces += [second.train_step(*batch) for batch in data[split:]]
    return {"straight": straight, "resumed": pieces, "sync_state": sorted(second.sync_state_arrays())}
