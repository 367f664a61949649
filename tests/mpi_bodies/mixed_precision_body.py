"""Rank bodies for tests/test_mixed_precision.py: each returns values for pytest to compare.

``against_references`` trains a layout for k steps three times, in float64, in bf16 or fp16, and
(rank 0, over MPI.COMM_SELF) as one process in the same 16-bit precision, and reports how far the
16-bit parameters (the fp32 masters, gathered) lie from the float64 ones against the bound of
``adam_drift_bound``, and whether they equal one process's bit for bit.
"""
import math

import numpy as np
from mpi4py import MPI

from minipar.backend import set_default_dtype, to_host, xp
from minipar.comm import Communicator
from minipar.nn.gpt import GPTConfig
from minipar.train import TrainConfig, Trainer, learning_rate_at

MODEL = dict(vocab_size=16, block_size=8, n_layer=4, n_head=4, n_embd=32)


def batches(batch_size, model_config, steps, seed=7):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, model_config.vocab_size, (batch_size, model_config.block_size + 1)) for _ in range(steps)]
    return [(xp.asarray(i[:, :-1]), xp.asarray(i[:, 1:])) for i in ids]


def adam_step_bound(t, betas):
    """max |m̂_t / (√v̂_t + ε)| over every gradient sequence: by Cauchy-Schwarz on m_t = (1-β1) Σ β1^j g_{t-j},
    |m_t| ≤ (1-β1) √(Σ_{j<t} (β1²/β2)^j) √(v_t / (1-β2)); with the bias corrections (docs/mixed_precision.md)."""
    beta1, beta2 = betas
    ratio = beta1**2 / beta2
    return ((1 - beta1) / (1 - beta1**t) * math.sqrt((1 - beta2**t) / (1 - beta2))
            * math.sqrt((1 - ratio**t) / (1 - ratio)))


def adam_drift_bound(config, steps):
    """Two AdamW runs from the same weights (no weight decay) part by at most Σ_t 2 η_t c_t per element."""
    return sum(2 * learning_rate_at(config, t) * adam_step_bound(t + 1, config.betas) for t in range(steps))


def train(world, model_config, steps, **options):
    config = TrainConfig(steps=steps, batch_size=options.pop("batch_size", 16), warmup_steps=2, learning_rate=1e-2,
                         **options)
    trainer = Trainer(model_config, config, world)
    start = trainer.gather_state()
    losses = [trainer.train_step(inputs, targets) for inputs, targets in batches(config.batch_size, model_config, steps)]
    return trainer, config, start, losses, trainer.gather_state(), trainer.precision.skipped_steps


def largest_difference(state, reference):
    return max(float(np.max(np.abs(to_host(state[name]).astype(np.float64) - to_host(reference[name]))))
               for name in reference)


def against_references(comm, cases, steps):
    """Per case (a layout with ``precision`` and ``reference_microbatches``): rank 0 reports the largest
    |θ16 − θ64| after ``steps`` steps, the bound, both runs' losses, and equality with one process."""
    set_default_dtype(xp.float32)
    world, reported = Communicator(comm), []
    model_config = GPTConfig(**MODEL)
    for case in cases:
        options = dict(case)
        precision, reference_m = options.pop("precision"), options.pop("reference_microbatches")
        _, config, start16, losses16, state16, skipped = train(world, model_config, steps, precision=precision, **options)
        _, _, start64, losses64, state64, _ = train(world, model_config, steps, dtype="float64", **options)
        if world.rank == 0:
            alone = Communicator(MPI.COMM_SELF)
            one = dict(options, dp=1, tp=1, pp=1, zero=0, microbatches=reference_m, sequence_parallel=False)
            for key in ("schedule", "virtual_stages", "overlap"):
                one.pop(key, None)
            _, _, _, losses_one, state_one, _ = train(alone, model_config, steps, precision=precision, **one)
            initial = largest_difference(start16, start64)
            reported.append({
                "case": case, "skipped_steps": skipped, "difference": largest_difference(state16, state64),
                "initial_difference": initial,
                "bound": initial + adam_drift_bound(config, steps), "losses16": losses16, "losses64": losses64,
                "equals_one_process": all(np.array_equal(to_host(state16[k]), to_host(state_one[k])) for k in state_one),
                "losses_equal_one_process": losses16 == losses_one,
                "difference_from_one_process": largest_difference(state16, state_one)})
    return reported


def overflow_on_one_rank(comm, layout, overflow_rank):
    """fp16: plant an inf in one gradient of rank ``overflow_rank`` after the first step's backward.
    Every rank must skip that step (parameters unchanged, scale halved) and step normally on the next."""
    set_default_dtype(xp.float32)
    world = Communicator(comm)
    model_config = GPTConfig(**dict(MODEL, n_layer=2, n_head=2, n_embd=16))
    config = TrainConfig(steps=3, batch_size=8, warmup_steps=1, precision="fp16", **layout)
    trainer = Trainer(model_config, config, world)
    decisions = []
    for step, (inputs, targets) in enumerate(batches(config.batch_size, model_config, 3)):
        before = [t.data.copy() for t in trainer.sync.updated]
        trainer.compute_gradients(inputs, targets)
        if step == 1 and world.rank == overflow_rank:
            trainer.sync.updated[0].grad.reshape(-1)[0] = np.inf
        trainer.update()
        changed = any(not np.array_equal(b, t.data) for b, t in zip(before, trainer.sync.updated, strict=True))
        decisions.append({"changed": changed, "scale": trainer.precision.scale,
                          "skipped": trainer.precision.skipped_steps})
    return decisions


def memory_against_formulas(comm):
    """bf16 on every rank as dp = N: each ZeRO stage's bytes after a step against ZeRO's Figure 1
    (Rajbhandari et al. 2020) and the planner's mixed-precision figures; stage 1 counts its full
    gradients at their peak, as the paper does (they exist whole until the reduce-scatter)."""
    from minipar.plan.memory import paper_parameter_memory, state_bytes
    from minipar.plan.model import ModelSpec
    from minipar.plan.strategy import Strategy

    set_default_dtype(xp.float32)
    world = Communicator(comm)
    model_config, count, rows = GPTConfig(**MODEL), comm.size, []
    for stage in (0, 1, 2, 3):
        config = TrainConfig(steps=2, batch_size=8, warmup_steps=1, dp=count, zero=stage, precision="bf16")
        trainer = Trainer(model_config, config, world)
        for inputs, targets in batches(config.batch_size, model_config, 1):
            trainer.train_step(inputs, targets)
        report, psi = trainer.memory_report(), trainer.num_parameters()
        full_gradients = report["peak_full_gradients"] if stage == 1 else report["gradients"]
        measured = {"parameters": report["parameters"], "gradients": full_gradients,
                    "optimizer_states": report["optimizer_states"]}
        strategy = Strategy(dp=count, tp=1, pp=1, batch_size=8, zero=stage, precision="mixed")
        rows.append({"stage": stage, "psi": psi, "measured": measured, "held": sum(measured.values()),
                     "master_weights": report["master_weights"], "storage_bytes": report["storage_bytes"],
                     "formula": {0: 16 * psi, 1: (4 + 12 / count) * psi, 2: (2 + 14 / count) * psi,
                                 3: 16 * psi / count}[stage],
                     "planner": paper_parameter_memory(psi, stage, count),
                     "planner_total": state_bytes(ModelSpec.from_gpt_config(model_config), strategy, 0)})
    return rows
