"""The command line's arguments for train, sample and topology: their flags, defaults and types.

``minipar/__main__.py`` holds the commands (``COMMANDS``) and defines only the chosen command's
arguments, so these are read for ``train`` and ``sample`` without the planner or the course being
imported. A new mesh axis is one ``layout.add_argument`` in ``add_layout_arguments``.

Every value is checked by its type here (a positive integer, a finite number) or by the configuration
it fills (``TrainConfig``, ``GPTConfig``), whose messages name these flags (``minipar.cli_config``).
"""
import argparse

from minipar.cli_device import add_device_arguments


def integer_at_least(minimum, what):
    """An argparse type: an integer >= ``minimum`` (``what`` names it in the message)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type by it in its own messages
    return parse


positive_int = integer_at_least(1, "a positive integer")
non_negative_int = integer_at_least(0, "an integer >= 0")


def finite_float(text):
    """An argparse type: a finite float (no nan, no inf)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_model_arguments(parser):
    group = parser.add_argument_group("model (GPTConfig)")
    group.add_argument("--n-layer", type=positive_int, default=2)
    group.add_argument("--n-head", type=positive_int, default=4)
    group.add_argument("--n-embd", type=positive_int, default=64)
    group.add_argument("--block-size", type=positive_int, default=None,
                       help="context length; default: one line of the addition task (10 for 2 digits), 64 for --data")
    group.add_argument("--dropout", type=finite_float, default=0.0)
    group.add_argument("--vocab-multiple", type=positive_int, default=8,
                       help="pad the vocabulary to a multiple of this (so it splits over tensor-parallel ranks)")
    group.add_argument("--model-seed", type=non_negative_int, default=1337)
    experts = parser.add_argument_group("mixture of experts (GPTConfig; docs/expert_parallel.md)")
    experts.add_argument("--experts", type=non_negative_int, default=0,
                         help="E expert MLPs in place of every block's MLP (0: a dense MLP)")
    experts.add_argument("--top-k", type=positive_int, default=2, help="experts per token (1 or 2)")
    experts.add_argument("--capacity-factor", type=finite_float, default=1.25,
                         help="each expert takes at most CF*k*T/E tokens of a group; the rest are dropped")
    experts.add_argument("--aux-loss-weight", type=finite_float, default=0.01,
                         help="alpha of the load-balancing loss")


def add_train_arguments(parser):
    from minipar.train_config import TrainConfig

    defaults = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument("--data", default=None, help="a UTF-8 text file; default: the built-in addition task")
    group.add_argument("--digits", type=positive_int, default=2, help="digits per operand of the addition task")
    schedule = parser.add_argument_group(
        "the run's schedule (saved in the checkpoint; --resume continues it unless you give these again)")
    schedule.add_argument("--steps", type=positive_int, default=None,
                          help=f"optimizer steps of the whole run (default {defaults.steps}; "
                               f"addition: 1500 more per digit beyond 2)")
    schedule.add_argument("--lr", type=finite_float, default=None,
                          help=f"peak learning rate (default {defaults.learning_rate})")
    schedule.add_argument("--min-lr", type=finite_float, default=None,
                          help=f"where the cosine ends (default {defaults.min_learning_rate})")
    schedule.add_argument("--warmup", type=non_negative_int, default=None,
                          help=f"linear warmup steps (default {defaults.warmup_steps})")
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="global batch (sequences)")
    group.add_argument("--weight-decay", type=finite_float, default=defaults.weight_decay)
    group.add_argument("--grad-clip", type=finite_float, default=defaults.grad_clip)
    group.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="seeds the batches")
    group.add_argument("--dtype", choices=["float32", "float64"], default=defaults.dtype)
    group.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=defaults.precision,
                       help="bf16 or fp16: 16-bit compute on fp32 master weights (fp16 with dynamic loss "
                            "scaling; docs/mixed_precision.md)")
    group.add_argument("--eval-interval", type=positive_int, default=100)
    group.add_argument("--eval-batches", type=positive_int, default=8)
    add_checkpoint_arguments(parser)
    add_layout_arguments(parser, defaults)
    add_communication_arguments(parser, defaults)


def add_checkpoint_arguments(parser):
    saving = parser.add_argument_group("checkpoints")
    saving.add_argument("--out", default="out", help="folder for the checkpoint (checked writable before step 1)")
    saving.add_argument("--resume", default=None, help="a checkpoint to continue from (any layout)")
    saving.add_argument("--allow-new-data", action="store_true",
                        help="--resume on data whose character table differs from the checkpoint's (token ids "
                             "then mean other characters than the model learned)")
    saving.add_argument("--save-every", type=non_negative_int, default=None,
                        help="also save every N steps (default: every 500 steps for runs longer than 500; 0: never)")
    saving.add_argument("--keep", type=positive_int, default=2,
                        help="how many checkpoints to keep: the latest at OUT/ckpt.minipar, older ones "
                             "as OUT/ckpt-step-NNNNNN.minipar")
    saving.add_argument("--stop-after", type=positive_int, default=None,
                        help="stop (and save) after this step: a piece of the run, continued with --resume")


def add_layout_arguments(parser, defaults):
    """The mesh's axes (--dp --tp --pp --ep --cp) and how each mode runs on them."""
    from minipar.parallel.pipeline.schedules import SCHEDULE_NAMES

    layout = parser.add_argument_group("parallel layout")
    layout.add_argument("--dp", type=positive_int, default=1)
    layout.add_argument("--tp", type=positive_int, default=1)
    layout.add_argument("--pp", type=positive_int, default=1)
    layout.add_argument("--ep", type=positive_int, default=1,
                        help="expert-parallel ranks: each holds E/ep experts and its own rows (with --experts)")
    layout.add_argument("--cp", type=positive_int, default=1,
                        help="context-parallel ranks: each holds T/cp tokens of every sequence")
    layout.add_argument("--cp-layout", choices=["contiguous", "zigzag"], default=defaults.cp_layout,
                        help="zigzag: rank i holds chunks i and 2cp-1-i (balanced causal work)")
    layout.add_argument("--cp-attention", choices=["ring", "allgather"], default=defaults.cp_attention)
    layout.add_argument("--cp-overlap", action="store_true",
                        help="ring: post the next K/V block's receive before computing on the current one")
    layout.add_argument("--microbatches", type=positive_int, default=1)
    layout.add_argument("--schedule", choices=SCHEDULE_NAMES, default=defaults.schedule)
    layout.add_argument("--virtual-stages", type=positive_int, default=1, help="model chunks per rank (interleaved)")
    layout.add_argument("--split", default=None, help="blocks per pipeline chunk, e.g. 1,3")
    layout.add_argument("--recompute", action="store_true", help="activation recomputation in the pipeline")
    layout.add_argument("--sequence-parallel", action="store_true")
    layout.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    layout.add_argument("--bucket-mb", type=finite_float, default=defaults.bucket_megabytes)
    layout.add_argument("--overlap", action="store_true", help="overlap gradient allreduce with backward")
    layout.add_argument("--allreduce", choices=["mpi", "ring", "recursive_doubling", "tree", "hierarchical"],
                        default="mpi", help="hierarchical: inside each node, then across nodes (docs/communication.md)")
    layout.add_argument("--ranks-per-node", type=non_negative_int, default=0,
                        help="--allreduce hierarchical: simulated nodes of K ranks (default: MPI's shared-memory nodes)")


def add_communication_arguments(parser, defaults):
    cutting = parser.add_argument_group("cutting communication (docs/communication.md)")
    cutting.add_argument("--compress", choices=["none", "fp16", "bf16", "topk", "powersgd"], default="none",
                         help="how data-parallel gradients travel; all but none are lossy")
    cutting.add_argument("--topk-ratio", type=finite_float, default=defaults.topk_ratio,
                         help="--compress topk: fraction of each gradient tensor sent per step")
    cutting.add_argument("--powersgd-rank", type=positive_int, default=defaults.powersgd_rank,
                         help="--compress powersgd: rank r of the approximation")
    cutting.add_argument("--local-sgd", type=non_negative_int, default=0,
                         help="H > 0: no gradient exchange, average the parameters every H steps")
    cutting.add_argument("--optimizer", choices=["adamw", "sgd"], default=defaults.optimizer,
                         help="sgd: plain SGD (local SGD with H = 1 is then exactly data parallelism)")


def add_train_command_arguments(parser):
    add_model_arguments(parser)
    add_train_arguments(parser)
    add_device_arguments(parser)


def add_sample_arguments(parser):
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", default="\n", help="text to continue (at least one character)")
    parser.add_argument("--tokens", type=non_negative_int, default=100, help="how many tokens to generate")
    parser.add_argument("--temperature", type=finite_float, default=0.8, help="> 0; ignored with --greedy")
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=non_negative_int, default=0)


def add_topology_arguments(parser):
    from minipar.parallel.mesh import AXES, AXIS_ROLES

    for name in AXES:  # every axis of the mesh, so any mesh can be drawn
        parser.add_argument(f"--{name}", type=positive_int, default=1, help=AXIS_ROLES[name])

