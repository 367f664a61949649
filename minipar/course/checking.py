"""What a check is, and how it says what is wrong.

A check body runs on every rank of a communicator of one size and compares what the
student's code produced with an oracle computed on that rank alone (a single-process
computation, never the code under test). On the first wrong value it raises
``CheckFailure`` with one message: the value's name and index, expected vs got, the
formula the expected value comes from, and, where the data make it possible, what the
wrong value reveals (``digits_hint``: which ranks' contributions a sum holds).
"""
from dataclasses import dataclass

import numpy as np  # host-side oracles and comparisons (MPI buffers are host arrays)


class CheckFailure(AssertionError):
    """A wrong value; the message is what the student reads."""


# Seconds after which a rank still inside a check counts as stuck (a deadlock, a lost message). On a
# 2-core machine at load average 40-50 the reference's checks took 0.2-2 s each, the slowest (ZeRO-1
# and data parallelism on 8 ranks) 6-10.5 s; a hanging check ends within 20 s. A check may set less.
CHECK_LIMIT = 20.0


@dataclass(frozen=True)
class Check:
    name: str
    sizes: tuple      # communicator sizes to run on (ranks 0 … size−1 of the job)
    body: object      # body(mpi_comm) -> None; raises CheckFailure on a wrong value
    limit: float = None   # seconds before a rank counts as stuck, if shorter than the run's limit


def limit_of(check, limit):
    """The time limit of one check: its own where it has one and it is shorter."""
    return min(limit, check.limit) if check.limit else limit


def entries(checks):
    """``[(label, check, size)]`` in order: one graded entry per check and size."""
    return [(f"{check.name} [N={size}]", check, size) for check in checks for size in check.sizes]


def _show(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and np.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return f"{int(value)}"
    return f"{value:.10g}" if isinstance(value, float) else repr(value)


def compare(what, got, expected, formula, hint=None, rtol=1e-12, atol=1e-12):
    """Raise CheckFailure at the first element of ``got`` that is not ``expected``.

    ``formula`` says where the expected value comes from; ``hint(index, got, expected)``
    may add what the wrong value reveals.
    """
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        raise CheckFailure(f"{what}: expected shape {expected.shape}, got shape {got.shape}")
    wrong = ~np.isclose(got, expected, rtol=rtol, atol=atol)
    if not wrong.any():
        return
    index = tuple(int(i) for i in np.argwhere(wrong)[0])
    shown = f"[{', '.join(map(str, index))}]" if index else ""
    message = (f"{what}{shown}: expected {_show(expected[index])} ({formula}), got {_show(got[index])}"
               f" ({int(wrong.sum())} of {wrong.size} values wrong)")
    extra = hint(index, got[index], expected[index]) if hint else ""
    raise CheckFailure(message + (f"\n{extra}" if extra else ""))


def require(condition, message):
    if not condition:
        raise CheckFailure(message)


# The digit-per-rank trick of lesson 2: rank r contributes multiplier * 10^r, so a sum shows
# its contributors as digits (2022 on 4 ranks: ranks 1, 2 and 3 once each, with multiplier 2).
def digit_data(rank, count):
    """Element j of rank r is (1 + j mod 4) · 10^r: exact in float64 up to 15 ranks."""
    return np.array([(1 + j % 4) * 10.0 ** rank for j in range(count)])


def digit_sum(size, count):
    return sum(digit_data(rank, count) for rank in range(size))


def digits_hint(size):
    """A ``compare`` hint that reads a wrong sum of ``digit_data`` as contributions per rank."""

    def hint(index, got, expected):
        got = float(got)
        multiplier = 1 + index[-1] % 4
        if got != int(got) or got < 0 or got >= 10.0 ** size:
            return ""
        counts = [int(got // 10 ** rank) % 10 for rank in range(size)]
        if any(count % multiplier for count in counts):
            return ""
        counts = [count // multiplier for count in counts]
        missing = [rank for rank, count in enumerate(counts) if count == 0]
        extra = [f"rank {rank} {count} times" for rank, count in enumerate(counts) if count > 1]
        parts = []
        if missing:
            parts.append(f"contributions missing from rank{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(str, missing))}")
        if extra:
            parts.append("counted more than once: " + ", ".join(extra))
        return (" and ".join(parts) + " (element j of rank r is (1 + j mod 4)·10^r, so each digit "
                "counts one rank's contribution)") if parts else ""

    return hint


MESSAGE_BYTES = 4096   # what one rank tells the others about its failure, UTF-8, cut to fit
AGREE_WAIT = 2.0       # seconds a failed rank waits for the others to join before it reports alone


def agreed(comm, run, *args):
    """``run(*args)`` on every rank of the raw communicator ``comm``, then agree on the outcome.

    A rank that fails while the others carry on into the next step would leave them waiting for
    its messages, and the check would end as a hang after its limit. Here every rank tells the
    others whether it failed, and with what message (a non-blocking all-gather of a few bytes),
    before any goes on: all raise together, the others with the first failing rank's message. A
    failed rank whose partners do not join within ``AGREE_WAIT`` seconds (they are still waiting
    inside ``run`` for a message it never sent) reports alone, and the runner ends the job.
    """
    import time

    failure = None
    try:
        result = run(*args)
    except Exception as error:  # noqa: BLE001 - the student's code may raise anything; reported below
        failure = error
    text = "" if failure is None else (str(failure) if isinstance(failure, CheckFailure)
                                       else f"raised {type(failure).__name__}: {str(failure).strip()}")
    mine = np.zeros(MESSAGE_BYTES, dtype=np.uint8)
    encoded = text.encode()[:MESSAGE_BYTES - 1]
    mine[:len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
    everyone = np.zeros((comm.Get_size(), MESSAGE_BYTES), dtype=np.uint8)
    request = comm.Iallgather(mine, everyone)
    deadline = time.monotonic() + AGREE_WAIT
    while not request.Test():
        if failure is not None and time.monotonic() > deadline:
            raise failure
        time.sleep(0.001)
    if failure is not None:
        raise failure
    messages = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in everyone]
    failed = [(rank, message) for rank, message in enumerate(messages) if message]
    if failed:
        rank, message = failed[0]
        raise CheckFailure(message if message.startswith(("rank ", "stage ")) else f"rank {rank}: {message}")
    return result
