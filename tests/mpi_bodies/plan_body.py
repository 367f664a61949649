"""Rank bodies for tests/test_plan.py: run real steps, measure, return predicted and measured side by side.

Every rank computes the planner's prediction for its own grid coordinates and measures its own
step, and returns the pairs; the test compares them field by field, so a failure names the
layout, the rank and the quantity.
"""
from minipar.backend import xp
from minipar.comm import Communicator
from minipar.nn.gpt import GPTConfig
from minipar.plan.measure import measure_step
from minipar.plan.memory import activation_memory, parameter_memory, peak_full_gradient_bytes
from minipar.plan.model import ModelSpec
from minipar.plan.strategy import Strategy
from minipar.plan.traffic import bytes_per_group, coordinates
from minipar.train import TrainConfig, Trainer

MODEL = dict(vocab_size=64, block_size=16, n_layer=8, n_head=8, n_embd=32)
BATCH = 16


def strategy_of(config):
    return Strategy(config.dp, config.tp, config.pp, config.batch_size, config.microbatches, config.schedule,
                    config.virtual_stages, config.zero, config.sequence_parallel,
                    "full" if config.recompute else "", config.dtype and "fp32")


def predicted_and_measured(world, layout):
    """{"predicted": {...}, "measured": {...}} for this rank after a warm-up step and a measured one."""
    config = TrainConfig(steps=10, batch_size=BATCH, **layout)
    trainer = Trainer(GPTConfig(**MODEL), config, world)
    ids = xp.random.default_rng(0).integers(0, MODEL["vocab_size"], (BATCH, MODEL["block_size"] + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    trainer.train_step(inputs, targets)  # first step: AdamW's moments exist, the tied pair is split
    measured_step = measure_step(trainer, inputs, targets)
    report = trainer.memory_report()
    measured = {key: report[key] for key in ("parameters", "gradients", "optimizer_states")}
    measured["activations"] = measured_step["activations"]
    # Stage 1 holds every gradient whole during the step, predicted to the byte. Stages 2-3 hold one
    # unit at a time; the planner's figure for them is an upper bound (tests/test_zero.py measures it).
    whole_gradients = config.zero == 1 and config.dp > 1
    if whole_gradients:
        measured["peak full gradients"] = report["peak_full_gradients"]
    measured.update({f"bytes {group}": n for group, n in measured_step["bytes"].items()})

    model, strategy = ModelSpec.from_gpt_config(trainer.model_config), strategy_of(config)
    stage = coordinates(strategy, world.rank)[2]
    predicted = dict(parameter_memory(model, strategy, stage))
    predicted["activations"] = activation_memory(model, strategy, stage)
    if whole_gradients:
        predicted["peak full gradients"] = peak_full_gradient_bytes(model, strategy, stage)
    predicted.update({f"bytes {group}": n for group, n in bytes_per_group(model, strategy, world.rank).items()})
    return {"predicted": predicted, "measured": measured}


def compare_layouts(comm, layouts):
    """[{"layout", "predicted", "measured"}] for this rank, one per layout (pytest compares them)."""
    world = Communicator(comm)
    return [{"layout": layout, **predicted_and_measured(world, layout)} for layout in layouts]
