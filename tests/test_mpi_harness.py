"""minipar.testing runs bodies on N ranks, reports failures by rank, and kills hung jobs."""
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minipar import testing
from minipar.job import flush_to_launcher
from minipar.testing import find_mpiexec, results_from_ranks, run_on_ranks

BODY = "tests.mpi_bodies.harness_body"


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_every_rank_returns_its_result(nranks):
    results = results_from_ranks(nranks, f"{BODY}:check_allreduce")
    total = nranks * (nranks + 1) / 2
    expected = [{"rank": rank, "size": nranks, "values": [total] * 5} for rank in range(nranks)]
    assert results == expected, f"expected {expected}, got {results}"
    assert results.output.count("allreduce done") == nranks  # stdout still comes back


def test_old_stdout_interface_still_works():
    output = run_on_ranks(2, f"{BODY}:check_allreduce")
    assert output.count("allreduce done") == 2, output


def test_keyword_arguments_reach_the_body():
    arguments = dict(size=7, name="ring", sizes=[0, 1])
    results = results_from_ranks(2, f"{BODY}:echo_arguments", **arguments)
    assert results == [arguments, arguments], f"expected {arguments} on both ranks, got {results}"
    assert 'arguments: {"name": "ring", "size": 7, "sizes": [0, 1]}' in results.output


def test_unserialisable_result_fails_naming_the_rank():
    with pytest.raises(AssertionError, match=r"rank 1 of 2 failed:(.|\n)*must be JSON-serialisable, got object"):
        results_from_ranks(2, f"{BODY}:return_unserialisable", timeout=60, failing_rank=1)


def test_bulk_array_result_is_refused():
    with pytest.raises(AssertionError, match=r"rank 0 of 1 failed:(.|\n)*summarise arrays on the rank"):
        results_from_ranks(1, f"{BODY}:return_too_much", timeout=60)


@pytest.mark.parametrize("nranks", [2, 4])
def test_exception_on_one_rank_fails_promptly_naming_the_rank(nranks):
    started = time.perf_counter()
    with pytest.raises(AssertionError) as failure:
        run_on_ranks(nranks, f"{BODY}:fail_on_rank", timeout=60, failing_rank=1)
    elapsed = time.perf_counter() - started
    message = str(failure.value)
    assert f"rank 1 of {nranks} failed:" in message
    assert "RuntimeError: deliberate failure raised by rank 1" in message
    assert "in fail_on_rank" in message  # the traceback, not just the error line
    assert "rank 0 of" not in message  # only the failing rank reports
    assert "hung" not in message  # ended by Abort, not by the timeout
    assert elapsed < 30, f"a failing rank took {elapsed:.1f} s to end the job"


def _stderr_into_a_pipe(monkeypatch, text):
    """sys.stderr becomes the write end of a pipe holding ``text`` (as a rank's is, under mpiexec)."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # no descriptor: nothing to wait for
    stream.write(text)
    return read_end, stream


def test_a_rank_about_to_abort_waits_until_the_launcher_has_read_its_report(monkeypatch):
    # A CI run lost a failing rank's report: MPI_Abort killed the job while it was still in the pipe.
    read_end, stream = _stderr_into_a_pipe(monkeypatch, "rank 1 of 4 failed:\n" + "x" * 5000)
    taken = {}

    def slow_launcher():
        time.sleep(0.5)
        taken["when"], taken["text"] = time.monotonic(), os.read(read_end, 1 << 16).decode()

    reader = threading.Thread(target=slow_launcher)
    reader.start()
    flush_to_launcher(limit=30)
    returned = time.monotonic()
    reader.join()
    stream.close()
    os.close(read_end)
    assert "when" in taken and taken["when"] <= returned, "flush_to_launcher returned before the launcher read"
    assert taken["text"].startswith("rank 1 of 4 failed:") and len(taken["text"]) == 20 + 5000, taken["text"][:40]


def test_a_launcher_that_never_reads_delays_the_abort_only_up_to_the_limit(monkeypatch):
    read_end, stream = _stderr_into_a_pipe(monkeypatch, "y" * 100)
    started = time.monotonic()
    flush_to_launcher(limit=0.3)
    waited = time.monotonic() - started
    unread = len(os.read(read_end, 1 << 16))
    stream.close()
    os.close(read_end)
    assert unread == 100, f"expected the 100 bytes still in the pipe, found {unread}"
    assert 0.3 <= waited < 10, f"expected to give up after the 0.3 s limit, waited {waited:.2f} s"


def test_hung_rank_is_killed_by_the_timeout():
    started = time.perf_counter()
    with pytest.raises(AssertionError, match=r"MPI job hung: .*hang_on_rank on 2 ranks did not finish within 4 s"):
        run_on_ranks(2, f"{BODY}:hang_on_rank", timeout=4, hanging_rank=0)
    elapsed = time.perf_counter() - started
    assert elapsed < 4 + 12, f"killing the hung job took {elapsed - 4:.1f} s"


def test_missing_body_is_reported():
    with pytest.raises(AssertionError, match="rank 0 of 1 failed:(.|\n)*ModuleNotFoundError"):
        run_on_ranks(1, "tests.mpi_bodies.no_such_module:body", timeout=60)


def test_bad_target_is_rejected_before_launch():
    with pytest.raises(ValueError, match="package.module:function"):
        run_on_ranks(2, "tests.mpi_bodies.harness_body.check_allreduce")


def test_mpiexec_lookup(tmp_path):
    fake_python = tmp_path / "bin" / "python"
    fake_python.parent.mkdir()
    fake_python.touch()
    with pytest.raises(FileNotFoundError, match="no mpiexec found"):
        find_mpiexec(python=fake_python, search_path=str(tmp_path / "empty"))
    beside = fake_python.parent / "mpiexec"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    assert find_mpiexec(python=fake_python, search_path=str(tmp_path / "empty")) == str(beside)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from Linux's /proc")
def test_killing_a_job_reaches_processes_in_their_own_sessions(monkeypatch):
    """Like MPICH's ranks: children in sessions of their own, under a launcher that ignores SIGTERM."""
    monkeypatch.setattr(testing, "_TERMINATE_GRACE", 0.5)
    script = 'trap "" TERM; setsid sleep 300 & setsid sleep 300 & wait'
    launcher = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(tree := testing.process_tree(launcher.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(tree) == 2, tree

    testing._kill_job(launcher)

    def alive(pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"  # a zombie has already died

    while any(alive(pid) for pid, _ in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid, _ in tree), f"left running: {tree}"
    assert launcher.poll() is not None


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_model_forward_is_identical_on_every_rank(nranks):
    results = results_from_ranks(nranks, f"{BODY}:model_forward_is_identical_everywhere", timeout=120)
    differing = [result["logits_differing_from_rank_0"] for result in results]
    assert differing == [0] * nranks, f"logits differing from rank 0's, per rank: {differing}"
    losses = [result["loss"] for result in results]
    assert losses == [losses[0]] * nranks, f"losses differ across ranks: {losses}"
