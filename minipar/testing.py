"""Run a test body on N MPI ranks from pytest.

Parallel code can only be tested with several processes, so a test hands a
body to ``mpiexec`` and checks how the job ended:

    from minipar.testing import run_on_ranks

    def test_sum():
        results = results_from_ranks(4, "tests.mpi_bodies.my_body:check_sum", size=10)
        assert results == [45.0] * 4, f"expected 45.0 on every rank, got {results}"

    # tests/mpi_bodies/my_body.py
    def check_sum(comm, size):          # comm is MPI.COMM_WORLD
        ...                             # raise on any rank to fail the job at once
        return total                    # small, JSON-able: pytest compares it

``results_from_ranks`` returns each rank's return value, as a list indexed by
rank, for pytest to compare with what it expects; ``run_on_ranks`` returns the
job's stdout instead (older bodies print confirmation lines).

The parent (``run_on_ranks``) launches

    mpiexec -n N <python> -m minipar.testing package.module:function '<json kwargs>'

and each rank (the ``__main__`` block below) imports the body and calls it.
Two rules keep a broken test from hanging the suite:

- a rank whose body raises prints ``rank R of N failed:`` and its traceback,
  waits until the launcher has read them (an abort drops what is still in the
  pipe), then calls ``MPI.COMM_WORLD.Abort(1)``, which ends every rank at once, even
  ranks blocked in a collective that the failed rank will never join;
- the parent waits at most ``timeout`` seconds, then kills the whole job and
  fails with a message saying it hung (a deadlock is a bug, not a slow test).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The directory holding the ``minipar`` package: with a source checkout this is
# the repository root, so ``tests.mpi_bodies.*`` import on every rank.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent

# Seconds mpiexec gets to tear its ranks down after SIGTERM before SIGKILL.
_TERMINATE_GRACE = 5.0

# The keyword argument that carries the results file to the ranks (removed before the body is called).
_RESULTS_FILE = "_minipar_results_file"

# A rank's result travels as JSON through a pickled gather: metadata, never bulk arrays.
# Summarise arrays on the rank (a norm, a maximum difference, a few values) to stay under this.
MAX_RESULT_BYTES = 1 << 20


def find_mpiexec(python=None, search_path=None):
    """The ``mpiexec`` next to the Python interpreter, else the first one on PATH.

    Looking beside the interpreter first picks the launcher that belongs to the
    MPI library mpi4py was built against (``pip install mpich`` puts both in the
    environment's ``bin/``); a different MPI's launcher would start N unrelated
    one-rank jobs.
    """
    python = Path(python or sys.executable)
    beside_python = python.parent / "mpiexec"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("mpiexec", path=search_path)
    if on_path is None:
        raise FileNotFoundError(
            f"no mpiexec found next to {python} or on PATH; install an MPI launcher, "
            "for example `pip install mpich mpi4py`"
        )
    return on_path


def _launcher_flags_and_environment(mpiexec, environment):
    """Extra flags and variables Open MPI needs to behave like MPICH here.

    Open MPI refuses more ranks than cores without --oversubscribe and refuses
    to run as root without two variables; MPICH needs neither.
    """
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
        banner = version.stdout + version.stderr
    except (OSError, subprocess.TimeoutExpired):
        banner = ""
    if "Open MPI" not in banner and "OpenRTE" not in banner:
        return []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        environment.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        environment.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return ["--oversubscribe"]


def _child_environment():
    from minipar._threads import OVERSUBSCRIBED_MPICH

    environment = dict(os.environ)
    # Ranks share the machine's cores; one BLAS thread each avoids oversubscription.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        environment[name] = "1"
    # Test jobs share a few cores with pytest and each other: waiting ranks sleep instead of
    # spinning (see minipar/_threads.py), unless the caller chose otherwise.
    for name, value in OVERSUBSCRIBED_MPICH.items():
        environment.setdefault(name, value)
    # Leftover process-manager variables (pytest itself started under mpiexec)
    # would make the ranks try to join the wrong job.
    for name in list(environment):
        if name.startswith(("PMI_", "PMIX_")):
            del environment[name]
    search_roots = [str(PACKAGE_PARENT), os.getcwd()]
    if environment.get("PYTHONPATH"):
        search_roots.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(search_roots)
    return environment


def _start_times_by_parent():
    """``parent pid -> [(pid, start time)]`` for every process, from Linux's /proc (empty elsewhere)."""
    children_of = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if entry.name.isdigit():
            started = _start_time(int(entry.name), want_parent=True)
            if started is not None:
                children_of.setdefault(started[1], []).append((int(entry.name), started[0]))
    return children_of


def _start_time(pid, want_parent=False):
    """A process's start time (and parent pid): together with the pid, its identity."""
    try:
        # The fields after the ")" closing the command name start at field 3 (state);
        # the parent pid is field 4 and the start time field 22 (see proc(5)).
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (fields[19], int(fields[1])) if want_parent else fields[19]


def process_tree(root_pid, include_root=False):
    """Every descendant of ``root_pid`` (and the root itself if asked) as ``(pid, start time)``.

    MPICH's launcher puts each rank in a session of its own, so killing
    mpiexec's process group would leave the ranks spinning; we collect the tree
    before anything dies (orphans are re-parented and lose the trail).
    Also used by minipar.lessons to clean up after an ipyparallel cluster.
    """
    children_of = _start_times_by_parent()
    tree, frontier = ([(root_pid, _start_time(root_pid))] if include_root else []), [root_pid]
    while frontier:
        for child in children_of.get(frontier.pop(), []):
            tree.append(child)
            frontier.append(child[0])
    return tree


def kill_processes(processes):
    """SIGKILL each ``(pid, start time)`` that is still that same process (a pid can be reused)."""
    for pid, started in processes:
        if started is not None and _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _kill_job(process):
    """End mpiexec and every rank it started, politely first."""
    tree = process_tree(process.pid)
    process.terminate()  # mpiexec forwards this to every rank and cleans up
    try:
        process.wait(timeout=_TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
    kill_processes(tree)


def run_on_ranks(nranks, target, timeout=120, **kwargs):
    """Run ``target`` (``"package.module:function"``) as ``function(comm, **kwargs)`` on ``nranks`` ranks.

    ``kwargs`` must be JSON-serialisable. Returns the job's captured stdout (all
    ranks, interleaved). Raises ``AssertionError`` carrying stdout and stderr
    when the job exits non-zero (a body raised on some rank), or, after killing
    the job, when it runs longer than ``timeout`` seconds (it hung).
    """
    if not isinstance(nranks, int) or nranks < 1:
        raise ValueError(f"nranks must be a positive integer, got {nranks!r}")
    if ":" not in target:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    mpiexec = find_mpiexec()
    environment = _child_environment()
    command = [mpiexec, *_launcher_flags_and_environment(mpiexec, environment), "-n", str(nranks),
               sys.executable, "-m", "minipar.testing", target, json.dumps(kwargs)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               encoding="utf-8", errors="replace", env=environment, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException as interruption:  # the timeout, or Ctrl-C in pytest: never leave ranks behind
        _kill_job(process)
        if not isinstance(interruption, subprocess.TimeoutExpired):
            raise
        try:
            stdout, stderr = process.communicate(timeout=_TERMINATE_GRACE)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", "(output lost: pipes still open after the kill)"
        raise AssertionError(
            f"MPI job hung: {target} on {nranks} ranks did not finish within {timeout} s "
            f"and was killed.\n{_format_output(stdout, stderr)}"
        ) from None
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise AssertionError(
            f"MPI job failed: {target} on {nranks} ranks exited with code {process.returncode} "
            f"after {elapsed:.1f} s.\n{_format_output(stdout, stderr)}"
        )
    return stdout


class RankResults(list):
    """Each rank's return value, indexed by rank; ``output`` holds the job's stdout."""

    output = ""


def results_from_ranks(nranks, target, timeout=120, **kwargs):
    """Run ``target`` like ``run_on_ranks`` and return what ``function(comm, **kwargs)`` returned on each rank.

    Every rank's return value must be JSON-serialisable (NumPy scalars and small
    arrays are turned into numbers and lists) and at most ``MAX_RESULT_BYTES``
    long as JSON; rank 0 gathers them and writes one file that the parent reads.
    Returns a ``RankResults`` list (``results[r]`` is rank r's value) whose
    ``output`` attribute is the job's stdout. Failures and hangs raise as in
    ``run_on_ranks``.
    """
    if _RESULTS_FILE in kwargs:
        raise ValueError(f"{_RESULTS_FILE} is reserved for the harness")
    with tempfile.TemporaryDirectory(prefix="minipar-results-") as folder:
        path = Path(folder) / "results.json"
        output = run_on_ranks(nranks, target, timeout=timeout, **kwargs, **{_RESULTS_FILE: str(path)})
        if not path.is_file():
            raise AssertionError(f"{target} on {nranks} ranks exited cleanly but wrote no results.\n"
                                 f"{_format_output(output, '')}")
        results = RankResults(json.loads(path.read_text()))
    results.output = output
    return results


def _to_json(value):
    """``json.dumps``'s fallback: NumPy (or CuPy) scalars and arrays become numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a rank result must be JSON-serialisable, got {type(value).__name__}")


def _send_results(world, result, path):
    """Gather every rank's result (as JSON text) on rank 0, which writes them to ``path`` atomically."""
    text = json.dumps(result, default=_to_json)
    if len(text) > MAX_RESULT_BYTES:
        raise ValueError(f"rank {world.rank}'s result is {len(text)} bytes of JSON, over {MAX_RESULT_BYTES}: "
                         "summarise arrays on the rank instead of returning them")
    texts = world.gather(text, root=0)
    if world.rank == 0:
        partial = Path(path).with_suffix(".partial")
        partial.write_text("[" + ",\n".join(texts) + "]")
        os.replace(partial, path)


def _format_output(stdout, stderr):
    return f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"


def _run_body_on_this_rank(target, kwargs_json):
    """What each rank runs: import the body, call it, abort the job if it raises."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    try:
        import importlib

        module_name, function_name = target.split(":", 1)
        body = getattr(importlib.import_module(module_name), function_name)
        kwargs = json.loads(kwargs_json)
        results_file = kwargs.pop(_RESULTS_FILE, None)
        result = body(world, **kwargs)
        if results_file is not None:
            _send_results(world, result, results_file)
    except BaseException:  # noqa: BLE001 - any failure, even SystemExit, must end the whole job
        import traceback

        from minipar.job import flush_to_launcher

        sys.stdout.flush()
        sys.stderr.write(f"rank {world.rank} of {world.size} failed:\n{traceback.format_exc()}")
        flush_to_launcher()  # else the launcher may kill the job before it has read the report
        world.Abort(1)  # the launcher ends every rank; MPICH's MPI_Abort may return before it does,
        os._exit(1)  # so leave now rather than run on into MPI_Finalize with partners gone
    sys.stdout.flush()


if __name__ == "__main__":
    from minipar._threads import start_process

    start_process()  # the process-wide settings, as the CLI makes them (minipar/job.py)
    if len(sys.argv) != 3:
        sys.exit("usage: python -m minipar.testing package.module:function '<json kwargs>'")
    _run_body_on_this_rank(sys.argv[1], sys.argv[2])
