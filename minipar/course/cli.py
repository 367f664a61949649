"""python -m minipar course list | student DIR | check NAME [--dir DIR] | grade DIRS... --csv FILE

``check`` starts its own ``mpiexec``; launched as ``mpirun -n 8 python -m minipar course
check NAME`` it runs inside that job instead (every rank runs the checks, rank 0 prints),
where a failure that stops the job leaves the remaining checks not run.
"""
import argparse
import sys

from minipar.course.checking import CHECK_LIMIT
from minipar.errors import ConfigError


def add_arguments(parser):
    """The course's subcommands, on ``parser`` (the ``course`` row of minipar/__main__.py's COMMANDS)."""
    commands = parser.add_subparsers(dest="course_command", required=True, parser_class=type(parser))
    commands.add_parser("list", help="the exercises in order, with files and estimated minutes")
    student = commands.add_parser("student", help="write the student version (stubs instead of solutions)")
    student.add_argument("directory")
    check = commands.add_parser("check", help="grade one exercise on MPI ranks")
    check.add_argument("name")
    check.add_argument("--dir", default=".", help="the student's copy of the repository (default: here)")
    check.add_argument("--limit", type=float, default=CHECK_LIMIT,
                       help="seconds per check before a rank counts as stuck")
    grade = commands.add_parser("grade", help="grade a class: every exercise for each student directory")
    grade.add_argument("directories", nargs="+")
    grade.add_argument("--csv", required=True, help="the file to write, one row per student")
    grade.add_argument("--limit", type=float, default=CHECK_LIMIT)
    grade.add_argument("--only", default=None, help="comma-separated exercise names (default: all)")


def list_exercises():
    from minipar.course.checking import entries
    from minipar.course.registry import EXERCISES, checks_of

    total = 0
    print(f"{'#':>2}  {'exercise':<22} {'min':>4}  {'ranks':>5}  {'checks':>6}  where")
    for number, exercise in enumerate(EXERCISES, start=1):
        total += exercise.minutes
        where = "; ".join(f"{path}: {', '.join(f for p, f in exercise.regions if p == path)}"
                          for path in exercise.paths)
        print(f"{number:>2}  {exercise.name:<22} {exercise.minutes:>4}  {exercise.world_size:>5}  "
              f"{len(entries(checks_of(exercise))):>6}  {where}")
        print(f"    {exercise.title}; read {exercise.lesson} and {exercise.docs}")
        if exercise.lesson_part:
            print(f"    (of {exercise.lesson}: {exercise.lesson_part})")
    print(f"about {total // 60} h {total % 60} min in all; check one with "
          "`python -m minipar course check NAME` (or under `mpirun -n 8`)")


def check_inside_job(name, limit):
    """Run the checks in this MPI job; every rank returns the same exit code."""
    import shutil
    import tempfile

    from mpi4py import MPI

    from minipar.course.registry import exercise_named
    from minipar.course.runner import run

    exercise_named(name)  # a wrong name fails on every rank alike, before any rank waits for another
    world = MPI.COMM_WORLD
    result_dir = world.bcast(tempfile.mkdtemp(prefix="minipar-course-") if world.rank == 0 else None)
    if world.rank == 0:
        print(f"course check {name} inside this job of {world.size} ranks (limit {limit:g} s per check)", flush=True)
    passed, total = run(name, result_dir, limit, report=True)
    world.Barrier()
    if world.rank == 0:
        shutil.rmtree(result_dir, ignore_errors=True)
    return 0 if passed == total else 1


def run(arguments):
    from minipar._threads import launched_by_mpi

    if arguments.course_command == "list":
        list_exercises()
        return 0
    if arguments.course_command == "student":
        from minipar.course.student import write_student_version

        found, notebooks = write_student_version(arguments.directory)
        exercises = sum(len(functions) for functions in found.values())
        print(f"wrote the student version to {arguments.directory}: {exercises} functions stubbed in "
              f"{len(found)} files, {sum(map(len, notebooks.values()))} notebook exercises in {len(notebooks)} "
              f"lessons; start with docs/course/student.md there")
        return 0
    if arguments.course_command == "check":
        if launched_by_mpi:
            if arguments.dir != ".":
                raise ConfigError("--dir has no effect under mpirun (the job already imported minipar); "
                                  "cd into the directory instead")
            return check_inside_job(arguments.name, arguments.limit)
        from minipar.course.grader import check, check_overlaid

        say = lambda line: print(line, flush=True)  # noqa: E731
        if _grading_from_the_reference(arguments.name, arguments.dir):
            print(f"only {arguments.name}'s functions are taken from {arguments.dir}; the rest is the reference")
            result = check_overlaid(arguments.name, arguments.dir, arguments.limit, out=say)
        else:
            result = check(arguments.name, arguments.dir, arguments.limit, out=say)
        return 0 if result.passed == result.total else 1
    from minipar.course.grader import grade

    names = arguments.only.split(",") if arguments.only else None
    rows = grade(arguments.directories, arguments.csv, arguments.limit, names=names)
    return 0 if all(row[name] == "pass" for row in rows for name in (names or [e.name for e in _exercises()])) else 1


def _exercises():
    from minipar.course.registry import EXERCISES

    return EXERCISES


def _grading_from_the_reference(name, directory):
    """True when this minipar holds the solutions and ``directory`` is another tree (a student's)."""
    from pathlib import Path

    from minipar.course.markers import BEGIN
    from minipar.course.registry import exercise_named
    from minipar.course.student import reference_root

    try:
        root = reference_root()
    except ConfigError:
        return False
    exercise = exercise_named(name)
    return (Path(directory).resolve() != root
            and all(BEGIN in (root / path).read_text() for path in exercise.paths))


def main(argv=None):
    """``python -m minipar.course.cli ...``, the same as ``python -m minipar course ...``."""
    parser = argparse.ArgumentParser(prog="python -m minipar course", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
