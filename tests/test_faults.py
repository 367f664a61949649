"""Fault injection: whatever fails, on whichever ranks, the job ends promptly, says why once, and loses nothing.

Every case launches a real job (``mpiexec`` and the CLI, or a user's script calling the public
``minipar.__main__.main``), breaks it on purpose, and checks three things: how fast every rank was
gone after the fault, the one message and who said it, and what is on disk afterwards. Faults are
injected by a small script (``INJECT``) that patches minipar on one rank, as a user's own script
around the public API would look; the CLI itself carries no test hooks.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minipar.testing import find_mpiexec, kill_processes, process_tree

pytestmark = pytest.mark.faults

ENDS_WITHIN = 5.0  # seconds from the fault until every rank is gone (the promise)
STARTS_WITHIN = 240.0  # a generous bound for starting ranks on a busy 2-core machine: a hang is far longer
SMALL = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "8", "--eval-interval", "1000",
         "--eval-batches", "1"]

# A user's script: patch minipar on one rank (the fault), then run the CLI's main() through the API.
INJECT = textwrap.dedent("""
    import errno, sys, time
    from minipar.job import start_process
    start_process()  # what python -m minipar does first (and what a user's script under mpiexec does)
    from mpi4py import MPI
    import minipar.train, minipar.run, minipar.parallel.distributed_checkpoint as dc
    from minipar.errors import DataError
    from minipar.__main__ import main

    RANK, WHERE, AT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    here = MPI.COMM_WORLD.Get_rank() == RANK

    def mark():  # when the fault happens, for the test's clock
        print(f"FAULT AT {time.time():.3f}", file=sys.stderr, flush=True)

    if here and WHERE == "gradients":  # an exception mid-step, while the other ranks wait in a collective
        original = minipar.train.Trainer.update
        def broken(self):
            if self.step_count == AT:
                mark()
                raise ZeroDivisionError("injected bug")
            return original(self)
        minipar.train.Trainer.update = broken
    if here and WHERE == "exit":  # user code calls sys.exit on one rank mid-step
        original_update = minipar.train.Trainer.update
        def exits(self):
            if self.step_count == 3:
                mark()
                sys.exit(AT)
            return original_update(self)
        minipar.train.Trainer.update = exits
    if here and WHERE == "batch":  # a DataError on one rank mid-run
        original_batch = minipar.data.Dataset.get_batch
        def broken_batch(self, split, *args):
            if split == "train" and args[-1] == AT:
                mark()
                raise DataError("injected: the batch file went away")
            return original_batch(self, split, *args)
        minipar.data.Dataset.get_batch = broken_batch
    if here and WHERE == "check":  # a DataError on one rank while checking the data up front
        def broken_dataset(**kwargs):
            mark()
            raise DataError("injected: cannot read the data here")
        minipar.run.addition_dataset = broken_dataset
    if here and WHERE == "disk":  # the disk fills up while this rank writes its shard, at save number AT
        original_write, saves = dc.write_array_file, []
        def full_disk(path, arrays, metadata=None):
            saves.append(path)
            if len(saves) == AT:
                mark()
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return original_write(path, arrays, metadata)
        dc.write_array_file = full_disk
    sys.exit(main(sys.argv[4:]))
""")


class Job:
    """A running job whose output lands in files (so the test can watch it), with its start time."""

    def __init__(self, command, folder):
        self.out, self.err = open(folder / "stdout.txt", "w+"), open(folder / "stderr.txt", "w+")
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
        self.started = time.time()
        self.process = subprocess.Popen(command, stdout=self.out, stderr=self.err, env=environment,
                                        start_new_session=True)

    def output(self):
        self.out.flush(), self.err.flush()
        return Path(self.out.name).read_text(), Path(self.err.name).read_text()

    def wait_for(self, text, timeout=STARTS_WITHIN):
        """Seconds until ``text`` appears in stdout or stderr; fails if the job ends or takes too long first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in part for part in self.output()):
                return
            assert self.process.poll() is None, f"job ended before printing {text!r}:\n{self.output()}"
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output()}")

    def finish(self, timeout=STARTS_WITHIN):
        """(exit status, time it ended, stdout, stderr); a job still running after ``timeout`` is a hang."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job hung: still running after {timeout} s:\n{self.output()}") from None
        ended = time.time()
        return (self.process.returncode, ended, *self.output())

    def kill(self):
        tree = process_tree(self.process.pid, include_root=True)
        kill_processes(tree)
        self.process.wait(timeout=30)

    def rank_pids(self):
        """The pids of the ranks: the python processes below the launcher."""
        return [pid for pid, started in process_tree(self.process.pid)
                if "python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")]


def cli(ranks, *arguments):
    command = [sys.executable, "-m", "minipar", *arguments]
    return [find_mpiexec(), "-n", str(ranks), *command] if ranks > 1 else command


def script(tmp_path, ranks, rank, where, at, *arguments):
    path = tmp_path / "user_script.py"
    path.write_text(INJECT)
    return [find_mpiexec(), "-n", str(ranks), sys.executable, str(path), str(rank), where, str(at), *arguments]


def fault_time(stderr):
    times = re.findall(r"FAULT AT ([0-9.]+)", stderr)  # the progress bar may share its line
    assert len(times) == 1, stderr
    return float(times[0])


def report(case, code, seconds, stderr):
    """One row of the closing table (shown by ``pytest -rP``): the case, exit status, seconds, first message line."""
    first = next((line for line in stderr.splitlines() if line.startswith(("error", "interrupted"))), "")
    print(f"FAULT-TABLE | {case} | {code} | {seconds:.1f} | {first[:160]}")


def index_of(folder):
    return json.loads((Path(folder) / "ckpt.minipar" / "index.json").read_text())


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ---- an error on some ranks ------------------------------------------------------------------
def test_exception_on_one_rank_mid_step_ends_every_rank_with_one_message(tmp_path):
    out = tmp_path / "out"
    job = Job(script(tmp_path, 4, 3, "gradients", 6, "train", "--dp", "2", "--pp", "2", "--microbatches", "2",
                     "--steps", "20", "--save-every", "4", "--out", str(out), *SMALL, "--n-layer", "2"), tmp_path)
    code, ended, stdout, stderr = job.finish()
    report("exception on rank 3 of 4 mid-step", code, ended - fault_time(stderr), stderr)
    assert code == 1, stderr
    assert ended - fault_time(stderr) < ENDS_WITHIN, stderr
    assert stderr.count("error on rank 3 of 4: ZeroDivisionError: injected bug; ending the job") == 1, stderr
    assert stderr.count("Traceback") == 1, stderr  # the failed rank's own, nobody else's
    assert index_of(out)["step"] == 4 and leftovers(out) == []  # the save before the fault is whole


@pytest.mark.parametrize("code", [7, 0])
def test_sys_exit_on_one_rank_ends_every_rank_naming_the_rank_and_the_code(tmp_path, code):
    """sys.exit on one rank used to leave it in MPI_Finalize, waiting for partners stuck in a collective."""
    job = Job(script(tmp_path, 4, 2, "exit", code, "train", "--dp", "2", "--tp", "2", "--steps", "50",
                     "--out", str(tmp_path / "out"), *SMALL), tmp_path)
    status, ended, stdout, stderr = job.finish()
    report(f"sys.exit({code}) on rank 2 of 4 mid-step", status, ended - fault_time(stderr), stderr)
    assert status == (code or 1), stderr  # the rank's own code; 0 cannot say that the job failed, so 1
    assert ended - fault_time(stderr) < ENDS_WITHIN, stderr
    said = f"error on rank 2 of 4: sys.exit({code}) was called (SystemExit, exit code {code}); ending the job"
    assert stderr.count(said) == 1 and stderr.count("error on rank") == 1, stderr


@pytest.mark.parametrize("where", ["check", pytest.param("batch", marks=pytest.mark.slow)])
def test_data_error_on_one_rank_is_said_once_naming_the_rank(tmp_path, where):
    out = tmp_path / "out"
    job = Job(script(tmp_path, 4, 3, where, 3, "train", "--dp", "4", "--steps", "8", "--save-every", "2",
                     "--out", str(out), *SMALL), tmp_path)
    code, ended, stdout, stderr = job.finish()
    report(f"DataError on rank 3 of 4 ({where})", code, ended - fault_time(stderr), stderr)
    assert code == 2, stderr
    assert ended - fault_time(stderr) < ENDS_WITHIN, stderr
    if where == "check":  # found while checking: every rank learns it, rank 0 says it
        assert stderr.count("error: on rank 3 of 4: injected: cannot read the data here") == 1, stderr
        assert not out.exists() or not (out / "ckpt.minipar").exists()
    else:  # found alone mid-run: the rank that knows says it
        assert stderr.count("error on rank 3 of 4: injected: the batch file went away; ending the job") == 1, stderr
        assert index_of(out)["step"] == 2 and leftovers(out) == []
    assert "Traceback" not in stderr


def test_data_file_missing_on_half_the_ranks(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    missing = tmp_path / "missing.txt"
    common = ["train", "--dp", "4", "--steps", "2", "--block-size", "8", "--out", str(tmp_path / "out"), *SMALL]
    mpiexec = find_mpiexec()
    command = [mpiexec, "-n", "2", sys.executable, "-m", "minipar", *common, "--data", str(text), ":",
               "-n", "2", sys.executable, "-m", "minipar", *common, "--data", str(missing)]
    job = Job(command, tmp_path)
    code, ended, stdout, stderr = job.finish()
    report("data file missing on ranks 2, 3 of 4 (MPMD)", code, ended - job.started, stderr)
    assert code == 2, stderr
    assert stderr.count(f"error: on ranks 2, 3 of 4: data file '{missing}' does not exist") == 1, stderr
    assert "Traceback" not in stderr and not (tmp_path / "out" / "ckpt.minipar").exists()


@pytest.mark.slow
def test_ranks_started_with_different_data_refuse_to_train(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("abcdefgh\n" * 50)
    second.write_text("abcdefgh\n" * 49 + "hgfedcba\n")
    common = ["train", "--dp", "2", "--steps", "2", "--block-size", "8", "--out", str(tmp_path / "out"), *SMALL]
    command = [find_mpiexec(), "-n", "1", sys.executable, "-m", "minipar", *common, "--data", str(first), ":",
               "-n", "1", sys.executable, "-m", "minipar", *common, "--data", str(second)]
    code, ended, stdout, stderr = Job(command, tmp_path).finish()
    assert code == 2 and stderr.count("error: rank 1 of 2 were started with another configuration") == 1, stderr


# ---- Ctrl-C and kill -9 ----------------------------------------------------------------------
def test_ctrl_c_to_the_launcher_ends_every_rank(tmp_path):
    out = tmp_path / "out"
    job = Job(cli(4, "train", "--dp", "2", "--tp", "2", "--steps", "100000", "--save-every", "3", "--out", str(out),
                  *SMALL), tmp_path)
    job.wait_for("checkpoint written")
    sent = time.time()
    job.process.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does to mpiexec
    code, ended, stdout, stderr = job.finish()
    report("SIGINT to mpiexec (4 ranks)", code, ended - sent, stderr)
    assert code != 0 and ended - sent < ENDS_WITHIN, (code, ended - sent, stderr)
    assert stderr.count("interrupted (Ctrl-C)") == 1 and "Traceback" not in stderr, stderr
    index = index_of(out)
    assert index["step"] % 3 == 0 and index["step"] >= 3, index["step"]
    # A Ctrl-C that lands during a save leaves what that save had made (ranks end at once): its unfinished
    # .partial- folder while writing, or the previous checkpoint's .old- folder once the new one is in
    # place but the old one not yet deleted. Either way the checkpoint in place is whole (read above),
    # and the next save removes the leftover.
    assert all(".partial-" in name or ".old-" in name for name in leftovers(out)), leftovers(out)
    resumed = Job(cli(1, "train", "--steps", str(index["step"] + 1), "--resume", str(out / "ckpt.minipar"),
                      "--out", str(out), *SMALL), tmp_path)
    code, _, _, stderr = resumed.finish()
    assert code == 0 and leftovers(out) == [] and index_of(out)["step"] == index["step"] + 1, stderr


# SIGINT this long after mpiexec starts 8 ranks: every step of 0.1 s lands somewhere else in start-up
# (Python starting, minipar's imports, MPI_Init, the checks, the first steps). A few run by default.
START_UP_DELAYS = [round(0.1 * tenth, 1) for tenth in range(1, 21)]
# Plain launches early enough to meet Python's own start-up (docs/checkpoints.md)
# are slow cases; 0.2 s blocked is inside that start-up.
QUICK_DELAYS = {"python": (1.0, 2.0), "blocked": (0.2, 0.5)}
# The launch that closes Python's start-up window (minipar/ctrl_c.py): each rank execs Python with SIGINT
# already blocked (GNU coreutils' env, 8.31 or later), so the watcher takes a Ctrl-C however early it comes.
BLOCKED = ["env", "--block-signal=INT"]
MAIN = Path(__file__).resolve().parent.parent / "minipar" / "__main__.py"
FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)', re.M)
EXCEPTION = re.compile(r"^(?P<name>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning))\b", re.M)


def env_blocks_signals():
    try:
        return subprocess.run([*BLOCKED, "true"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def python_start_up_tracebacks(stderr):
    """How many ranks printed Python's own KeyboardInterrupt: a Ctrl-C that met them before minipar's first line.

    The ranks' tracebacks interleave line by line in the launcher's stderr, so lines are judged one by one:
    every exception is a KeyboardInterrupt, except one per "Fatal Python error: init_..." that is not the
    site import's (a SIGINT while the interpreter builds sys.stdin and the like surfaces as a TypeError); and
    every frame in minipar is one that runs before SIGINT is blocked (the package's ``__init__``,
    ``__main__`` up to its ``start_process()`` call, ``_threads`` while it is imported, ``start_process``
    itself). Anything else (an error, a frame of minipar after the block) fails the test, naming it.
    """
    last_unguarded = next(number for number, line in enumerate(MAIN.read_text().splitlines(), 1)
                          if line.strip() == "start_process()")
    for match in FRAME.finditer(stderr):
        path, line, function = Path(match["path"]), int(match["line"]), match["function"]
        if not path.is_relative_to(MAIN.parent):
            continue  # Python's own modules and the editable install's finder
        unguarded = ((path.name == "__main__.py" and line <= last_unguarded) or path.name == "__init__.py"
                     or (path.name == "_threads.py" and function in ("<module>", "start_process")))
        assert unguarded, f"a traceback in minipar after SIGINT was blocked ({match[0].strip()}):\n{stderr}"
    names = [match["name"] for match in EXCEPTION.finditer(stderr)]
    fatal = re.findall(r"Fatal Python error: (?!Fatal)(\w+)", stderr)  # two ranks' headers may share a line
    assert all(phase.startswith("init_") for phase in fatal), f"a fatal error after start-up: {fatal}\n{stderr}"
    others = [name for name in names if name != "KeyboardInterrupt"]
    assert len(others) <= sum(phase != "init_import_site" for phase in fatal), \
        f"an error, not Python's start-up interrupted: {names}\n{stderr}"
    return len(names)


def ended_before_minipar(code, stdout, stderr, launch):
    """The signal came before any of minipar could run: mpiexec itself killed by it (the launcher was
    still starting: nothing printed, nothing left running), or a rank killed by it before Python had
    installed its handler (MPICH's banner: EXIT CODE 2, the signal's number). With the plain launch,
    rank 0 may also have died in Python's start-up while others reached minipar, which leave without a
    word (rank 0 speaks for all): every rank silent and hydra's banner the only message."""
    launcher_killed = code == -signal.SIGINT and not stdout.strip() and not stderr.strip()
    all_silent = launch == "python" and "BAD TERMINATION" in stdout and not stderr.strip()
    return launcher_killed or all_silent or "EXIT CODE: 2\n" in stdout


@pytest.mark.parametrize("launch, delay", [
    (launch, delay) if delay in QUICK_DELAYS[launch] else pytest.param(launch, delay, marks=pytest.mark.slow)
    for launch in ("python", "blocked") for delay in START_UP_DELAYS])
def test_ctrl_c_during_start_up_ends_every_rank_with_one_message(tmp_path, launch, delay):
    """SIGINT to mpiexec ``delay`` s after it starts 8 ranks: the job ends within 5 s, non-zero, before training.

    Launched as the README does (``python``), a rank still in Python's own start-up prints Python's
    KeyboardInterrupt (nothing of minipar has run there); every other rank is silent and rank 0 says it once.
    Launched with SIGINT blocked from exec (``blocked``), there is one message and no traceback at any delay.
    """
    if launch == "blocked" and not env_blocks_signals():
        pytest.skip("this env has no --block-signal (GNU coreutils 8.31 or later)")
    command = cli(8, "train", "--dp", "2", "--tp", "2", "--pp", "2", "--steps", "100000", "--out",
                  str(tmp_path / "out"), *SMALL, "--n-layer", "2")  # two stages need two layers
    if launch == "blocked":
        command = [command[0], "-n", "8", *BLOCKED, *command[3:]]
    job = Job(command, tmp_path)
    time.sleep(max(0.0, job.started + delay - time.time()))
    sent = time.time()
    job.process.send_signal(signal.SIGINT)
    code, ended, stdout, stderr = job.finish(timeout=60)
    report(f"SIGINT {delay:.1f} s after launching 8 ranks ({launch})", code, ended - sent, stderr)
    # The job must end because of the signal, not a bad configuration ("error: ..." at a line's start, unlike
    # Python's "Fatal Python error:").
    assert not re.search(r"(?:^|\r)error:", stderr, re.M), stderr
    assert code != 0 and ended - sent < ENDS_WITHIN, (code, ended - sent, stderr)
    assert "step 1" not in stdout and "train loss" not in stdout, stdout  # never a run on to the end
    interrupted_in_python = python_start_up_tracebacks(stderr)
    if launch == "blocked":
        assert interrupted_in_python == 0 and "Traceback" not in stderr, stderr
    if not interrupted_in_python and not ended_before_minipar(code, stdout, stderr, launch):
        assert stderr.count("interrupted (Ctrl-C)") == 1, (stdout, stderr)  # every rank in minipar: rank 0 says it


def test_a_killed_rank_is_named_by_the_pid_record(tmp_path):
    """hydra SIGKILLs every other rank at once and its banner may name another rank's PID, so nobody can say
    which rank died; OUT/ranks.json, written at start, maps the PID the kernel names to the rank."""
    out = tmp_path / "out"
    job = Job(cli(2, "train", "--dp", "2", "--steps", "100000", "--save-every", "2", "--out", str(out), *SMALL),
              tmp_path)
    job.wait_for("checkpoint written")
    record = json.loads((out / "ranks.json").read_text())["ranks"]
    victim = job.rank_pids()[-1]
    assert sorted(entry["pid"] for entry in record) == sorted(job.rank_pids()), record
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    code, ended, stdout, stderr = job.finish()
    named = [entry["rank"] for entry in record if entry["pid"] == victim]
    report(f"SIGKILL of rank {named[0]} of 2 (named by OUT/ranks.json)", code, ended - killed,
           stderr.replace("=   BAD", "error (launcher): BAD"))
    assert code != 0 and ended - killed < ENDS_WITHIN, (code, ended - killed, stderr)
    assert len(named) == 1 and named[0] in (0, 1)


@pytest.mark.slow
def test_kill_9_of_one_rank_loses_only_the_steps_since_the_last_save_and_resume_is_exact(tmp_path):
    """Kill one rank mid-run: the job ends, the last periodic checkpoint is whole, and finishing the run
    from it gives, bit for bit, the losses of the same run never interrupted (same layout)."""
    # Long enough that the ranks are still running when the kill comes, on an idle machine too.
    steps = 1000
    layout = ["--dp", "2", "--zero", "1", "--warmup", "3", "--steps", str(steps), "--save-every", "4", *SMALL]
    straight = tmp_path / "straight"
    code, _, _, stderr = Job(cli(2, "train", *layout, "--out", str(straight)), tmp_path).finish()
    assert code == 0, stderr
    broken = tmp_path / "broken"
    job = Job(cli(2, "train", *layout, "--out", str(broken)), tmp_path)
    job.wait_for("(step 8)")
    victim = job.rank_pids()[-1]
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    code, ended, stdout, stderr = job.finish()
    report("SIGKILL of rank 1 of 2", code, ended - killed, stderr)
    assert code != 0 and ended - killed < 30.0, (code, ended - killed, stderr)
    saved = index_of(broken)["step"]  # reading the index checks the checkpoint in place is whole
    # A kill during a save (one every 4 steps) may leave that save's unfinished `.partial-` folder, or the
    # replaced `.old-` one, beside the whole checkpoint; the next save removes them (docs/checkpoints.md).
    assert 8 <= saved < steps, (saved, leftovers(broken))
    code, _, _, stderr = Job(cli(2, "train", *layout, "--out", str(broken), "--resume",
                                 str(broken / "ckpt.minipar")), tmp_path).finish()
    assert code == 0, stderr
    assert leftovers(broken) == [], leftovers(broken)
    expected, got = index_of(straight)["history"]["train_loss"], index_of(broken)["history"]["train_loss"]
    assert len(got) == steps and got == expected


# ---- the disk fills up -----------------------------------------------------------------------
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    job = Job(script(tmp_path, 2, 1, "disk", 2, "train", "--tp", "2", "--steps", "12", "--save-every", "3",
                     "--out", str(out), *SMALL), tmp_path)
    code, ended, stdout, stderr = job.finish()
    report("ENOSPC on rank 1 of 2 at the 2nd save", code, ended - fault_time(stderr), stderr)
    assert code == 2, stderr
    assert ended - fault_time(stderr) < ENDS_WITHIN, stderr
    message = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "failed on rank 1" in message[0] and "No space left on device" in message[0]
    assert "the previous checkpoint, if any, is untouched" in message[0] and "Traceback" not in stderr
    assert index_of(out)["step"] == 3 and leftovers(out) == []


# ---- the sequence-parallel + pipeline hang, and a NaN loss ------------------------------------
def test_sequence_parallel_block_size_is_checked_on_every_stage(tmp_path):
    job = Job(cli(4, "train", "--tp", "2", "--pp", "2", "--sequence-parallel", "--block-size", "9", "--steps", "2",
                  "--out", str(tmp_path / "out"), *SMALL, "--n-layer", "2"), tmp_path)
    code, ended, stdout, stderr = job.finish()
    report("--sequence-parallel, tp 2 x pp 2, block 9", code, ended - job.started, stderr)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.count("the block size (9) must be divisible by tp (2)") == 1, stderr


def test_nan_loss_stops_every_rank_naming_the_step_and_saves_nothing(tmp_path):
    out = tmp_path / "out"
    job = Job(cli(2, "train", "--dp", "2", "--lr", "1e30", "--warmup", "0", "--grad-clip", "0", "--steps", "30",
                  "--save-every", "1", "--out", str(out), *SMALL), tmp_path)
    code, ended, stdout, stderr = job.finish()
    report("NaN loss (--lr 1e30), 2 ranks", code, ended - job.started, stderr)
    assert code == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "the training loss is nan at step" in line]
    assert len(lines) == 1, stderr
    step = int(lines[0].split("at step ")[1].split()[0])
    saved = index_of(out)  # saved after every step that was still finite, never after the NaN
    assert saved["step"] == step - 1
    assert all(value == value for value in saved["history"]["train_loss"])


# ---- exact resume, with the cosine active, under ZeRO and sequence parallelism ------------------
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--dp", "2", "--zero", "2"], ["--tp", "2", "--sequence-parallel"]],
                         ids=["zero2", "sequence-parallel"])
def test_a_run_split_in_two_gives_the_losses_of_the_uninterrupted_run(tmp_path, layout):
    run = ["train", *layout, "--steps", "16", "--warmup", "3", *SMALL]
    code, _, _, stderr = Job(cli(2, *run, "--out", str(tmp_path / "a")), tmp_path).finish()
    assert code == 0, stderr
    code, _, _, stderr = Job(cli(2, *run, "--stop-after", "7", "--out", str(tmp_path / "b")), tmp_path).finish()
    assert code == 0, stderr
    # No schedule on the second command line: it comes from the checkpoint.
    code, _, _, stderr = Job(cli(2, "train", *layout, *SMALL, "--resume", str(tmp_path / "b" / "ckpt.minipar"),
                                 "--out", str(tmp_path / "b")), tmp_path).finish()
    assert code == 0, stderr
    expected, got = index_of(tmp_path / "a")["history"]["train_loss"], index_of(tmp_path / "b")["history"]["train_loss"]
    assert len(got) == 16 and got == expected


@pytest.mark.slow
def test_a_run_resumed_under_another_layout_agrees_to_float64_rounding(tmp_path):
    run = ["train", "--steps", "12", "--warmup", "3", "--dtype", "float64", *SMALL]
    code, _, _, stderr = Job(cli(1, *run, "--out", str(tmp_path / "a")), tmp_path).finish()
    assert code == 0, stderr
    code, _, _, stderr = Job(cli(2, *run, "--dp", "2", "--stop-after", "6", "--out", str(tmp_path / "b")),
                             tmp_path).finish()
    assert code == 0, stderr
    code, _, _, stderr = Job(cli(1, "train", "--dtype", "float64", *SMALL, "--resume",
                                 str(tmp_path / "b" / "ckpt.minipar"), "--out", str(tmp_path / "b")), tmp_path).finish()
    assert code == 0, stderr
    expected, got = index_of(tmp_path / "a")["history"]["train_loss"], index_of(tmp_path / "b")["history"]["train_loss"]
    assert len(got) == 12
    assert max(abs(a - b) / abs(a) for a, b in zip(expected, got)) < 1e-12


# ---- the Ctrl-C watcher itself, without a launcher (fast) -------------------------------------
class RecordingWorld:
    """A stand-in COMM_WORLD of 2 ranks whose Abort records the code and stops the caller."""

    def __init__(self, rank=0):
        self.rank, self.aborted = rank, []

    def Get_rank(self):  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self):  # noqa: N802
        return 2

    def Abort(self, code):  # noqa: N802
        self.aborted.append(code)
        raise SystemExit("aborted")  # instead of ending the process


def test_the_ctrl_c_watcher_aborts_a_running_job(monkeypatch, capsys):
    from minipar import ctrl_c, job

    world = RecordingWorld()
    monkeypatch.setitem(job._guarded, "world", world)
    monkeypatch.setattr(job, "flush_to_launcher", lambda limit=None: None)
    with pytest.raises(SystemExit, match="aborted"):
        ctrl_c._on_ctrl_c()  # what the watcher thread runs when sigwait returns SIGINT
    assert world.aborted == [job.EXIT_INTERRUPTED]
    assert "error on rank 0 of 2: interrupted (Ctrl-C); ending the job" in capsys.readouterr().err


WATCHER_PROBE = textwrap.dedent("""
    import os, signal, sys, time
    import minipar.ctrl_c
    minipar.ctrl_c._START_WAIT = float(sys.argv[1])
    minipar.ctrl_c.watch_ctrl_c()  # start_process up to starting MPI: this rank is still starting
    print(f"SENT AT {time.time():.3f}", flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # as mpiexec forwards a Ctrl-C
    time.sleep(30)  # the main thread never hears it: SIGINT is blocked here, the watcher takes it
    print("ran on")
""")


PARTNER_DIES_WHILE_STARTING = textwrap.dedent("""
    import os, time
    if os.environ["PMI_RANK"] == "1":
        os._exit(1)  # as a rank does whose Python start-up met the Ctrl-C: gone before MPI_Init
    from minipar.job import start_process
    print("STARTING", flush=True)
    start_process()  # rank 0 now waits in MPI_Init for rank 1, which will never come
    from mpi4py import MPI  # noqa: F401 (started by now; without start_mpi this import is MPI_Init, GIL held)
    print("ran on", flush=True)
""")


def test_ctrl_c_ends_a_rank_waiting_in_mpi_init_for_a_partner_that_died_starting(tmp_path):
    """The plain launch's hang: a rank died in Python's start-up, another waits in MPI_Init for it.

    mpi4py's MPI_Init holds the GIL, so the watcher could not run and the waiting rank (and mpiexec)
    stayed forever; minipar.ctrl_c.start_mpi calls MPI_Init with the GIL released, and the watcher's
    3 s wait for MPI ends it."""
    probe = tmp_path / "probe.py"
    probe.write_text(PARTNER_DIES_WHILE_STARTING)
    job = Job([find_mpiexec(), "-n", "2", sys.executable, str(probe)], tmp_path)
    job.wait_for("STARTING")
    time.sleep(1.0)  # rank 0 is inside MPI_Init by now
    sent = time.time()
    job.process.send_signal(signal.SIGINT)
    code, ended, stdout, stderr = job.finish(timeout=60)
    report("SIGINT while rank 0 waits in MPI_Init for a rank dead in start-up", code, ended - sent, stderr)
    assert code != 0 and ended - sent < ENDS_WITHIN, (code, ended - sent, stderr)
    assert "ran on" not in stdout and "Traceback" not in stderr, (stdout, stderr)
    assert stderr.count("interrupted (Ctrl-C) on rank 0 of 2 before MPI was running") == 1, stderr


def test_the_ctrl_c_watcher_ends_a_rank_that_mpi_never_reached():
    """A rank still starting (no MPI yet) and told Ctrl-C leaves with 130; rank 0 says it once."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("PMI_", "OMPI_", "PMIX_"))}
    environment.update(PMI_SIZE="2", PMI_RANK="0", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run([sys.executable, "-c", WATCHER_PROBE, "0.2"], env=environment, capture_output=True,
                            text=True, timeout=60)
    ended, sent = time.time(), float(re.findall(r"SENT AT ([0-9.]+)", result.stdout)[0])
    assert result.returncode == 130 and ended - sent < ENDS_WITHIN, (result.returncode, ended - sent, result.stderr)
    assert "ran on" not in result.stdout and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("interrupted (Ctrl-C) on rank 0 of 2 before MPI was running") == 1, result.stderr


def test_an_inherited_sigint_block_is_lifted_without_a_launcher():
    """``env --block-signal=INT`` is for ranks under mpiexec; without a launcher nothing watches SIGINT, so
    ``start_process`` unblocks it and a Ctrl-C is Python's KeyboardInterrupt, as usual."""
    if not env_blocks_signals():
        pytest.skip("this env has no --block-signal (GNU coreutils 8.31 or later)")
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_LOCALNRANKS"))}
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    probe = ("import signal; before = signal.pthread_sigmask(signal.SIG_BLOCK, set())\n"
             "from minipar._threads import start_process; start_process()\n"
             "print(sorted(before), sorted(signal.pthread_sigmask(signal.SIG_BLOCK, set())))")
    result = subprocess.run([*BLOCKED, sys.executable, "-c", probe], env=environment, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["[<Signals.SIGINT:", "2>]", "[]"], result


# ---- every message names the flag the user typed (in-process: the checks every rank runs) ------
@pytest.mark.parametrize("arguments, message", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--lr", "-1"], "--lr must be >= 0.0, got -1.0"),
    (["--min-lr", "-1"], "--min-lr must be >= 0.0, got -1.0"),
    (["--bucket-mb", "0"], "--bucket-mb must be > 0.0, got 0.0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0.0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0.0"),
    (["--virtual-stages", "2"], "--virtual-stages 2 needs the interleaved schedule"),
    (["--compress", "topk", "--topk-ratio", "2"], "--topk-ratio must be in (0, 1], got 2.0"),
    (["--batch-size", "6", "--microbatches", "4"], "--batch-size 6 (the global batch) must be divisible"),
])
def test_configuration_messages_name_the_flags(tmp_path, arguments, message):
    from minipar.__main__ import _prepare

    with pytest.raises(Exception) as raised:  # noqa: B017 - the message is what is checked
        _prepare(["train", *arguments, "--out", str(tmp_path)], 1)
    text = str(raised.value)
    assert message in text, text
    for field in ("learning_rate", "bucket_megabytes", "warmup_steps", "virtual_stages", "topk_ratio", "stop-after"):
        assert field not in text, text


def test_a_missing_gpu_stack_is_named_in_one_sentence(tmp_path):
    """Where CuPy is absent (this machine, CI), --backend cupy says what to install instead of a traceback."""
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: the message for its absence cannot be seen")
    code, ended, stdout, stderr = Job(cli(1, "train", "--backend", "cupy", "--steps", "1", "--out",
                                          str(tmp_path / "out")), tmp_path).finish(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("error: --backend cupy: CuPy is not installed") and 'pip install -e ".[gpu]"' in lines[0]
