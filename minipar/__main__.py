"""The command line: python -m minipar train | sample | topology.

    python -m minipar train --steps 600                       # one process, the addition task
    mpiexec -n 8 python -m minipar train --dp 2 --tp 2 --pp 2 --microbatches 4
    python -m minipar sample --checkpoint out/ckpt.minipar --prompt "12+34="
    python -m minipar topology --dp 2 --tp 2 --pp 2

Rank discipline: every rank parses and validates the same arguments (so a bad layout
gives the same error everywhere and nobody waits for a partner that has quit); world rank
0 alone prints progress, evaluates and writes the checkpoint. An unexpected exception on
any rank prints that rank's traceback and aborts the whole MPI job at once.
"""
import argparse
import sys
import time
import traceback

from minipar.errors import CheckpointError, ConfigError, DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def add_model_arguments(parser):
    group = parser.add_argument_group("model (GPTConfig)")
    group.add_argument("--n-layer", type=int, default=2)
    group.add_argument("--n-head", type=int, default=4)
    group.add_argument("--n-embd", type=int, default=64)
    group.add_argument("--block-size", type=int, default=None,
                       help="context length; default: one line of the addition task (10 for 2 digits), 64 for --data")
    group.add_argument("--dropout", type=float, default=0.0)
    group.add_argument("--vocab-multiple", type=int, default=8,
                       help="pad the vocabulary to a multiple of this (so it splits over tensor-parallel ranks)")
    group.add_argument("--model-seed", type=int, default=1337)


def add_train_arguments(parser):
    from minipar.train import TrainConfig

    defaults = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument("--data", default=None, help="a UTF-8 text file; default: the built-in addition task")
    group.add_argument("--digits", type=int, default=2, help="digits per operand of the addition task")
    group.add_argument("--steps", type=int, default=defaults.steps)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch (sequences)")
    group.add_argument("--lr", type=float, default=defaults.learning_rate)
    group.add_argument("--min-lr", type=float, default=defaults.min_learning_rate)
    group.add_argument("--warmup", type=int, default=defaults.warmup_steps)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    group.add_argument("--seed", type=int, default=defaults.seed, help="seeds the batches")
    group.add_argument("--dtype", choices=["float32", "float64"], default=defaults.dtype)
    group.add_argument("--eval-interval", type=int, default=100)
    group.add_argument("--eval-batches", type=int, default=8)
    group.add_argument("--out", default="out", help="folder for the checkpoint (and traces)")
    group.add_argument("--resume", default=None, help="a checkpoint to continue from")
    layout = parser.add_argument_group("parallel layout")
    layout.add_argument("--dp", type=int, default=1)
    layout.add_argument("--tp", type=int, default=1)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--microbatches", type=int, default=1)
    layout.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved"], default=defaults.schedule)
    layout.add_argument("--virtual-stages", type=int, default=1, help="model chunks per rank (interleaved)")
    layout.add_argument("--split", default=None, help="blocks per pipeline chunk, e.g. 1,3")
    layout.add_argument("--recompute", action="store_true", help="activation recomputation in the pipeline")
    layout.add_argument("--sequence-parallel", action="store_true")
    layout.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    layout.add_argument("--bucket-mb", type=float, default=defaults.bucket_megabytes)
    layout.add_argument("--overlap", action="store_true", help="overlap gradient allreduce with backward")
    layout.add_argument("--allreduce", choices=["mpi", "ring", "recursive_doubling", "tree"], default="mpi")


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m minipar", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a GPT (single process or under mpiexec)")
    add_model_arguments(train)
    add_train_arguments(train)
    sample = commands.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--checkpoint", required=True)
    sample.add_argument("--prompt", default="\n")
    sample.add_argument("--tokens", type=int, default=100)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--greedy", action="store_true")
    sample.add_argument("--seed", type=int, default=0)
    topology = commands.add_parser("topology", help="draw the dp x tp x pp process grid")
    for name in ("dp", "tp", "pp"):
        topology.add_argument(f"--{name}", type=int, default=1)
    commands.add_parser("course", add_help=False,
                        help="the course: list | student DIR | check NAME | grade DIRS --csv FILE")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["course"]:  # the course has its own command line (minipar/course/cli.py)
        from minipar.course.cli import main as course_main

        return course_main(argv[1:])
    arguments = parse_arguments(argv)
    from minipar.backend import reuse_freed_memory

    reuse_freed_memory()  # a program's choice, made here rather than on import
    if arguments.command == "topology":
        from minipar.parallel.topology import Layout

        layout = Layout(arguments.dp, arguments.tp, arguments.pp)
        layout.validate(layout.world_size)
        print(layout.describe())
        return 0
    if arguments.command == "sample":
        from minipar.run import sample

        return sample(arguments)
    if arguments.block_size is None:
        # An addition line is "ab+cd=" plus the reversed sum and a newline: 3 digits + 4 characters.
        arguments.block_size = 64 if arguments.data else 3 * arguments.digits + 4
    from minipar.run import train

    return train(arguments)


def run_as_job():
    """Run main(); turn errors into one clear line per job, and never leave ranks hanging."""
    from minipar._threads import launched_by_mpi

    rank, size = 0, 1
    if launched_by_mpi:
        from mpi4py import MPI

        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    try:
        return main()
    except USER_ERRORS as error:
        # Raised on every rank alike (validation runs everywhere first), so each can exit cleanly.
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception:
        print(f"rank {rank} of {size} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if size > 1:
            time.sleep(0.2)  # let the message reach the launcher before the job is torn down
            MPI.COMM_WORLD.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(run_as_job())
