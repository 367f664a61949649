"""The command line: python -m minipar train | sample | topology | plan | calibrate.

    python -m minipar train --steps 600                       # one process, the addition task
    mpiexec -n 8 python -m minipar train --dp 2 --tp 2 --pp 2 --microbatches 4
    python -m minipar sample --checkpoint out/ckpt.minipar --prompt "12+34="
    python -m minipar topology --dp 2 --tp 2 --pp 2
    python -m minipar plan --preset gpt3-175b --gpus 1024 --gpus-per-node 8 --gpu-memory 80
    mpiexec -n 8 python -m minipar calibrate --out out/calibration.json

Commands live in one table, ``COMMANDS``: a name, a help line, a function adding its arguments,
an optional ``check`` and the ``run`` itself. Adding a command is adding a row. Only the chosen
command's arguments are defined (``build_parser``); those of train, sample and topology are in
``minipar/cli_arguments.py``, the device flags in ``minipar/cli_device.py``.

Rank discipline: every rank parses the same command line and runs the command's ``check``
(configuration, data, checkpoint, output folder: local work, no communication); then one
collective (``minipar.job.agree``) tells every rank who failed and why, so a bad input ends all
ranks alike with one message from rank 0. World rank 0 alone prints progress, evaluates and writes
the checkpoint index. Anything that fails later, on any rank, or Ctrl-C, ends the whole MPI job
at once with one message naming the rank (``minipar.job``).

Process-wide settings (BLAS threads, MPICH's wait, the Ctrl-C watcher) are made by
``minipar.job.start_process``, the first statement below, before NumPy or mpi4py load.
"""
if __name__ == "__main__":  # the command line's entry point: process-wide settings first (minipar/job.py)
    from minipar._threads import start_process

    start_process()

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from minipar.cli_arguments import add_sample_arguments, add_topology_arguments, add_train_command_arguments
from minipar.cli_device import choose_backend
from minipar.errors import UsageError
from minipar.job import agree, fingerprint, job_world, on_every_rank, run_job, start_process


class ArgumentParser(argparse.ArgumentParser):
    """argparse, for a job of many ranks: errors become a UsageError (said once, by rank 0, after
    the ranks agree), help is printed by rank 0 only, and options are never abbreviated (``--micro 4``
    must not silently mean ``--microbatches 4``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def exit(self, status=0, message=None):
        """--help and --version: every rank parses alike and leaves alike (no abort, minipar.job.run_job)."""
        if message:
            self._print_message(message, sys.stderr)
        raise on_every_rank(SystemExit(status))

    def _print_message(self, message, file=None):
        world = job_world()
        if world is None or world.Get_rank() == 0:
            super()._print_message(message, file)


def check_topology(arguments, world_size):
    from minipar.parallel.mesh import AXES, MeshShape

    return MeshShape.of(**{name: getattr(arguments, name) for name in AXES}), None


def run_topology(shape):
    print(shape.describe())
    return 0


def check_train(arguments, world_size):
    from minipar.run import check_train as check

    return check(arguments, world_size)


def run_train(plan):
    from minipar.run import train_command

    return train_command(plan)


def check_sample(arguments, world_size):
    from minipar.run import check_sample as check

    return check(arguments, world_size)


def run_sample(plan):
    from minipar.run import sample

    return sample(plan)


def add_plan_arguments(parser):
    from minipar.plan import cli

    cli.add_arguments(parser)


def run_plan(arguments):
    from minipar.plan import cli

    return cli.run(arguments)


def add_calibrate_arguments(parser):
    from minipar.plan import calibrate

    calibrate.add_arguments(parser)


def run_calibrate(arguments):
    from minipar.plan import calibrate

    return calibrate.run(arguments)


def add_course_arguments(parser):
    from minipar.course import cli

    cli.add_arguments(parser)


def run_course(arguments):
    from minipar.course import cli

    return cli.run(arguments)


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable  # (parser) -> None
    run: Callable  # (plan) -> exit status; the plan is what check returned (the arguments by default)
    # (arguments, world size) -> (plan, fingerprint): every rank, local work only, no communication;
    # raise ConfigError / DataError / CheckpointError for bad input. The fingerprint (any JSON-able
    # value, or None) must be equal on every rank: it catches ranks started with other data.
    check: Optional[Callable] = None


COMMANDS = {
    "train": Command("train a GPT (single process or under mpiexec)", add_train_command_arguments, run_train,
                     check_train),
    "sample": Command("generate text from a checkpoint", add_sample_arguments, run_sample, check_sample),
    "topology": Command("draw the device mesh (--pp --dp --ep --cp --tp)", add_topology_arguments, run_topology, check_topology),
    "plan": Command("choose dp x tp x pp, ZeRO, micro-batches for a model", add_plan_arguments, run_plan),
    "calibrate": Command("measure this machine into a profile for plan", add_calibrate_arguments, run_calibrate),
    "course": Command("the course: list | student DIR | check NAME | grade DIRS --csv FILE (docs/course/)",
                      add_course_arguments, run_course),
}


def build_parser(argv=None):
    """The parser of ``python -m minipar``, with the arguments of the command ``argv`` names (its first
    word that is not an option), or of every command when ``argv`` is None. Only the chosen command's:
    defining ``plan``'s or ``course``'s would import the planner or the course on every rank of a
    training job."""
    chosen = None if argv is None else next((word for word in argv if not word.startswith("-")), None)
    parser = ArgumentParser(prog="python -m minipar", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, command in COMMANDS.items():
        arguments = commands.add_parser(name, help=command.help)
        if argv is None or name == chosen:
            command.add_arguments(arguments)
    return parser


def parse_arguments(argv):
    return build_parser(argv).parse_args(argv)


def _prepare(argv, world_size):
    """On this rank: parse, then the command's check. Returns ((command, plan), fingerprint)."""
    arguments = parse_arguments(argv)
    command = COMMANDS[arguments.command]
    plan, mark = command.check(arguments, world_size) if command.check else (arguments, None)
    return (command, plan), fingerprint(vars(arguments), mark)


def main(argv=None):
    """Run one command (``argv`` defaults to sys.argv[1:]); returns the exit status.

    Safe to call from a user's own script under mpiexec: a failure on any rank ends every rank.
    """
    argv = sys.argv[1:] if argv is None else list(argv)

    def body():
        choose_backend(argv)  # before the first import of minipar.backend
        from minipar.backend import ON_DEVICE, reuse_freed_memory

        reuse_freed_memory()  # a program's choice, made here rather than on import
        if ON_DEVICE:  # each rank's GPU, before anything (the data, loaded by the check) lands on one
            from minipar.comm.transport import select_device

            select_device()
        world = job_world()
        command, plan = agree(world, lambda: _prepare(argv, world.Get_size() if world is not None else 1))
        return command.run(plan)

    return run_job(body)


def run_as_job():
    """The console entry point: ``main()`` with its exit status."""
    start_process()
    return main()


if __name__ == "__main__":
    sys.exit(main())
