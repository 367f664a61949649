"""The command line -> GPTConfig and TrainConfig, for ``python -m minipar train``.

``build_configs`` fills both from the parsed arguments and the run's schedule (``run_schedule``:
steps, warmup and learning rates, from the command line, else the resumed checkpoint, else the
defaults). The configurations check themselves and name their fields; ``flags_in_messages`` turns
those names into the flags the user typed. Called by ``minipar.run.check_train``, on every rank.
"""
import math
from contextlib import contextmanager

from minipar.errors import ConfigError
from minipar.nn.gpt import GPTConfig
from minipar.train_config import TrainConfig


def build_configs(arguments, vocabulary_size, schedule):
    """GPTConfig and TrainConfig from the command line; ``schedule``: steps, warmup, lr, min lr of the run."""
    multiple = arguments.vocab_multiple
    if multiple < 1:
        raise ConfigError(f"--vocab-multiple must be at least 1, got {multiple}")
    with flags_in_messages():  # the checks name the flags the user typed (FLAG_OF_FIELD)
        model_config = GPTConfig(
            vocab_size=math.ceil(vocabulary_size / multiple) * multiple, block_size=arguments.block_size,
            n_layer=arguments.n_layer, n_head=arguments.n_head, n_embd=arguments.n_embd, dropout=arguments.dropout,
            seed=arguments.model_seed, n_experts=arguments.experts, top_k=arguments.top_k,
            capacity_factor=arguments.capacity_factor, aux_loss_weight=arguments.aux_loss_weight)
        train_config = TrainConfig(
            **schedule, batch_size=arguments.batch_size, weight_decay=arguments.weight_decay,
            grad_clip=arguments.grad_clip, seed=arguments.seed, dtype=arguments.dtype, precision=arguments.precision,
            dp=arguments.dp,
            tp=arguments.tp, pp=arguments.pp, ep=arguments.ep, cp=arguments.cp, cp_layout=arguments.cp_layout,
            cp_attention=arguments.cp_attention, cp_overlap=arguments.cp_overlap,
            microbatches=arguments.microbatches, schedule=arguments.schedule,
            virtual_stages=arguments.virtual_stages, split=parse_split(arguments.split), recompute=arguments.recompute,
            sequence_parallel=arguments.sequence_parallel, zero=arguments.zero, bucket_megabytes=arguments.bucket_mb,
            overlap=arguments.overlap, allreduce=arguments.allreduce, ranks_per_node=arguments.ranks_per_node,
            compress=arguments.compress, topk_ratio=arguments.topk_ratio, powersgd_rank=arguments.powersgd_rank,
            local_sgd=arguments.local_sgd, optimizer=arguments.optimizer)
    return model_config, train_config


# TrainConfig's checks name its fields (the Python API); the command line's user typed these flags.
FLAG_OF_FIELD = {"learning_rate": "--lr", "min_learning_rate": "--min-lr", "warmup_steps": "--warmup",
                 "bucket_megabytes": "--bucket-mb", "batch_size": "--batch-size", "weight_decay": "--weight-decay",
                 "grad_clip": "--grad-clip", "virtual_stages": "--virtual-stages", "topk_ratio": "--topk-ratio",
                 "powersgd_rank": "--powersgd-rank", "local_sgd": "--local-sgd", "ranks_per_node": "--ranks-per-node",
                 "sequence_parallel": "--sequence-parallel", "n_experts": "--experts", "top_k": "--top-k",
                 "capacity_factor": "--capacity-factor", "aux_loss_weight": "--aux-loss-weight",
                 "cp_layout": "--cp-layout", "cp_attention": "--cp-attention", "precision": "--precision"}
FLAG_AT_START = ("steps", "seed", "zero", "dtype", "optimizer", "compress", "microbatches", "schedule")


@contextmanager
def flags_in_messages():
    """Re-raise a ConfigError from TrainConfig with the command line's flag names in place of its field names."""
    import re

    try:
        yield
    except ConfigError as error:
        text = re.sub(r"(?<![\w-])(" + "|".join(FLAG_OF_FIELD) + r")(?!\w)", lambda m: FLAG_OF_FIELD[m.group(1)],
                      str(error))
        text = re.sub(r"^(" + "|".join(FLAG_AT_START) + r") must", r"--\1 must", text)
        text = re.sub(r"^(--[a-z-]+) = ", r"\1 ", text)
        text = re.sub(r"^global batch size (\d+)", r"--batch-size \1 (the global batch)", text)
        raise ConfigError(text) from None


def parse_split(text):
    """``--split 1,3`` -> (1, 3); a ConfigError for anything but positive integers separated by commas."""
    if text is None:
        return None
    try:
        split = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--split must list blocks per pipeline chunk as positive integers, e.g. 1,3; "
                          f"got {text!r}") from None
    if any(n < 1 for n in split):
        raise ConfigError(f"--split must list positive integers, got {text!r}")
    return split


SCHEDULE_OPTIONS = {"steps": "steps", "warmup_steps": "warmup", "learning_rate": "lr",
                    "min_learning_rate": "min_lr"}  # TrainConfig field -> command-line attribute


def addition_steps(digits, steps):
    """The default run length for d-digit addition: ``steps`` (2,000) up to 2 digits, 1,500 more per digit beyond.

    Wider operands make a longer sequence (3d + 4 tokens) with more answer digits, and the model sits
    longer on the plateau where it predicts the answer digits' frequencies before it finds the columns
    to add; a cosine that has decayed by then leaves it there. 4-digit addition in float32, one process:
    0% answer accuracy through a 2,000-step run (loss 1.727 throughout); a 4,000-step run left the first
    plateau near step 1,000 but sat on a second one (5-10%) to step 3,100 at least; a 5,000-step run
    reached 100% at step 4,000 and ended there. Layouts change nothing here, being equal to one process.
    """
    return steps + 1500 * max(0, digits - 2)


def run_schedule(arguments, index):
    """The run's schedule: from the command line where given, else from the resumed checkpoint, else the defaults.

    The checkpoint's schedule is what makes a resumed run continue the same cosine, so that any split
    of a run gives the losses of the uninterrupted one. Returns ({field: value}, [notes]).
    """
    defaults, saved = TrainConfig(), (index or {}).get("train_config") or {}
    if not getattr(arguments, "data", None):
        defaults.steps = addition_steps(getattr(arguments, "digits", 2), defaults.steps)
    schedule, notes = {}, []
    for field, option in SCHEDULE_OPTIONS.items():
        given = getattr(arguments, option)
        schedule[field] = given if given is not None else saved.get(field, getattr(defaults, field))
        if given is not None and field in saved and saved[field] != given:
            notes.append(f"--{option.replace('_', '-')} {given} replaces the checkpoint's {saved[field]}")
    return schedule, notes
