"""Checks for data parallelism (minipar/parallel/data_parallel.py) and ZeRO-1 (minipar/parallel/zero.py).

The oracle is one process: the same GPT (same seed, float64) on the whole global batch, one
backward, and for ZeRO the same clipping and AdamW step. Data-parallel rank d takes rows
[d B/N, (d+1) B/N) in m micro-batches; after the gradient sync its gradients must be the
single-process gradient, Δθ = (1/N) Σ_i Δθ_i, to about 1e-12.
"""
import numpy as np

from minipar.course.checking import Check, CheckFailure, compare, require

MODEL = {"vocab_size": 8, "block_size": 4, "n_layer": 2, "n_head": 2, "n_embd": 8}


def _batch(rows, seed=12):
    from minipar.backend import from_host, host_rng

    tokens = host_rng(seed).integers(0, MODEL["vocab_size"], (rows, MODEL["block_size"] + 1))
    return from_host(np.ascontiguousarray(tokens[:, :-1])), from_host(np.ascontiguousarray(tokens[:, 1:]))


def _single_process_gradients(inputs, targets):
    from minipar.backend import to_host
    from minipar.nn.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**MODEL))
    model(inputs, targets)[1].backward()
    return {name: np.asarray(to_host(p.grad)) for name, p in model.named_parameters()}


def ratio_hint(size):
    """A ``compare`` hint naming the usual scale mistakes of an average over ``size`` ranks."""
    known = [(size / (size - 1) if size > 1 else None, "divided by N − 1 instead of N"),
             (float(size), "summed but not divided by N"), (1.0 / size, "divided by N twice")]

    def hint(index, got, expected):
        if expected == 0 or got == 0 or not np.isfinite(got):
            return "a division by N − 1 = 0?" if size == 1 and not np.isfinite(got) else ""
        ratio = float(got) / float(expected)
        meanings = [meaning for value, meaning in known
                    if value is not None and value != 1 and abs(ratio - value) < 1e-9 * max(1.0, value)]
        return f"got / expected = {ratio:.6g}: {', or '.join(meanings)}?" if meanings else ""

    return hint


def _data_parallel_check(overlap, microbatches, bucket_bytes):
    def check(comm):
        from minipar.backend import set_default_dtype, to_host, xp
        from minipar.comm import Communicator
        from minipar.nn.gpt import GPT, GPTConfig
        from minipar.parallel.data_parallel import DataParallel, local_slice
        from minipar.parallel.pipeline.executor import split_microbatches

        set_default_dtype(xp.float64)
        dp_comm = Communicator(comm)
        rank, size, m = dp_comm.rank, dp_comm.size, microbatches
        inputs, targets = _batch(size * m * 2)
        expected = _single_process_gradients(inputs, targets)
        model = GPT(GPTConfig(**MODEL))
        dp = DataParallel(model.parameters(), dp_comm, bucket_bytes=bucket_bytes, overlap=overlap,
                          accumulation_steps=m)
        dp.start_step()
        mine = local_slice((inputs, targets), rank, size)
        micro = zip(split_microbatches(mine[0], m), split_microbatches(mine[1], m), strict=True)
        for index, (x, y) in enumerate(micro):
            dp_comm.reset_counters()
            (model(x, y)[1] * (1.0 / m)).backward()
            sent = sum(record.calls for name, record in dp_comm.counters.items() if "allreduce" in name)
            if index < m - 1 and sent:
                raise CheckFailure(
                    f"rank {rank}: {sent} allreduce(s) started during micro-batch {index + 1} of {m}; gradients "
                    f"are final only after the last one: communicate on the last micro-batch only (a parameter "
                    f"is ready at its m-th grad-ready hook)")
        dp.finish_gradient_sync()
        for name, p in model.named_parameters():
            require(p.grad is not None, f"rank {rank}: {name}.grad is None after finish_gradient_sync")
            compare(f"rank {rank}: {name}.grad after finish_gradient_sync, element", np.asarray(to_host(p.grad)),
                    expected[name], "Δθ = (1/N) Σ_i Δθ_i, the single-process gradient of the whole batch",
                    ratio_hint(size))

    return check


def _zero_check(comm):
    """ZeRO-1 through the Trainer: each rank's gradient part, then the parameters after AdamW."""
    from minipar.backend import set_default_dtype, to_host, xp
    from minipar.comm import Communicator
    from minipar.nn.gpt import GPT, GPTConfig
    from minipar.optim import AdamW, clip_grad_norm, decay_groups
    from minipar.train import TrainConfig, Trainer, learning_rate_at

    set_default_dtype(xp.float64)
    world = Communicator(comm)
    rank, size = world.rank, world.size
    config = TrainConfig(steps=2, batch_size=4 * size, dtype="float64", learning_rate=1e-2, warmup_steps=1,
                         dp=size, zero=1, microbatches=2)
    trainer = Trainer(GPTConfig(**MODEL), config, world)
    inputs, targets = _batch(4 * size)
    reference = GPT(GPTConfig(**MODEL))
    optimizer = AdamW(decay_groups(reference.named_parameters(), config.weight_decay), lr=config.learning_rate,
                      betas=config.betas, weight_decay=config.weight_decay)
    reference(inputs, targets)[1].backward()
    before = {name: np.asarray(to_host(p.data)).copy() for name, p in reference.named_parameters()}
    full_grads = {name: np.asarray(to_host(p.grad)).copy() for name, p in reference.named_parameters()}
    clip_grad_norm(reference.parameters(), config.grad_clip)
    optimizer.set_lr(learning_rate_at(config, 0))
    optimizer.step()

    trainer.compute_gradients(inputs, targets)
    for name, p in trainer.named_parameters:
        part = trainer.sync.updated_tensor(p)
        length = -(-p.size // size)                                        # s = ceil(n / N)
        padded = np.zeros(size * length)
        padded[:p.size] = full_grads[name].reshape(-1)
        require(part.grad is not None, f"rank {rank}: the part of {name} has no gradient after the sync")
        compare(f"rank {rank}: its part of dL/d{name} (flat elements [{rank * length}, {(rank + 1) * length}) of "
                f"{p.size}, zero-padded to {size} × {length}), element", np.asarray(to_host(part.grad)).reshape(-1),
                padded[rank * length:(rank + 1) * length],
                "ḡ_d = (1/N) Σ_i g_i on the part rank d owns", ratio_hint(size))
    trainer.update()
    for name, p in trainer.named_parameters:
        got = np.asarray(to_host(p.data)).reshape(-1)
        expected = np.asarray(to_host(dict(reference.named_parameters())[name].data)).reshape(-1)
        length = -(-p.size // size)

        def stale(index, got_value, expected_value, name=name, length=length):
            if got_value == before[name].reshape(-1)[index[0]]:
                return (f"this element still holds its value from before the step: the updated part of rank "
                        f"{index[0] // length} never arrived (all-gather the updated parts)")
            return ""

        compare(f"rank {rank}: {name} after the AdamW step, flat element", got, expected,
                "one process's clipped AdamW step", stale)


DATA_PARALLEL = [
    Check("gradient average, buckets, 2 micro-batches", (1, 2, 3, 4, 8), _data_parallel_check(False, 2, 512)),
    Check("gradient average, overlapped, 3 micro-batches", (2, 3, 8), _data_parallel_check(True, 3, 512)),
]
ZERO_1 = [
    Check("ZeRO-1 parts and step vs one process", (2, 3, 4, 8), _zero_check),  # dp 1: ZeRO is off
]
