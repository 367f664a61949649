"""Comparisons made on the ranks, judged in pytest.

A rank body records each comparison as (what, got, expected) with small JSON-able values and
returns ``Comparisons.report()``; ``minipar.testing.results_from_ranks`` brings every rank's
report back, and pytest calls ``assert_as_expected``, which fails listing every comparison, on
every rank, whose value differs from the expected one (not just the first, as an assert on a
rank would, and without searching a log). Arrays are summarised on the rank: their shape,
dtype and how many elements differ, plus the first or worst difference as a detail; they never
travel whole.

Nothing here imports MPI, so pytest can import it.
"""
import numpy as np

from minipar.backend import to_host


class Comparisons:
    def __init__(self):
        self.entries = []  # [what, got, expected, detail]
        self.checks = []  # names of the checks that ran, in order

    def value(self, what, got, expected):
        """Small values compared exactly: counts, bytes, shapes, names, messages."""
        self.entries.append([what, _plain(got), _plain(expected), ""])

    def true(self, what, condition, detail=""):
        self.entries.append([what, bool(condition), True, detail])

    def arrays_equal(self, what, got, expected):
        """Bit for bit: the number of differing elements must be 0."""
        got, expected = to_host(got), to_host(expected)
        if got.shape != expected.shape or got.dtype != expected.dtype:
            self.value(what, [list(got.shape), got.dtype.name], [list(expected.shape), expected.dtype.name])
            return
        differing = np.flatnonzero(got.reshape(-1) != expected.reshape(-1))
        detail = ""
        if differing.size:
            first = differing[0]
            detail = (f"first at flat index {first}: got {got.reshape(-1)[first].item()!r}, "
                      f"expected {expected.reshape(-1)[first].item()!r}")
        self.entries.append([what + ": differing elements", int(differing.size), 0, detail])

    def arrays_close(self, what, got, expected, rtol, atol=0.0):
        """Within |got - expected| <= atol + rtol |expected| everywhere: the number outside must be 0."""
        got, expected = np.asarray(to_host(got), dtype=np.float64), np.asarray(to_host(expected), dtype=np.float64)
        if got.shape != expected.shape:
            self.value(what + ": shape", list(got.shape), list(expected.shape))
            return
        error = np.abs(got - expected)
        outside = error > atol + rtol * np.abs(expected)
        detail = ""
        if outside.any():
            worst = int(np.argmax(np.where(outside, error, -1.0)))
            detail = (f"worst at flat index {worst}: got {got.reshape(-1)[worst].item()!r}, "
                      f"expected {expected.reshape(-1)[worst].item()!r} (rtol {rtol}, atol {atol})")
        self.entries.append([what + ": elements outside tolerance", int(outside.sum()), 0, detail])

    def report(self):
        return {"checks": self.checks, "comparisons": self.entries}


def _plain(value):
    """JSON's view of a value (tuples become lists), so rank and pytest compare like with like."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def assert_as_expected(results, checks=None, shown=40):
    """Fail listing every comparison that differs, on every rank; ``checks``: the names every rank must have run."""
    wrong, total = [], 0
    for rank, report in enumerate(results):
        if checks is not None:
            assert report["checks"] == list(checks), (
                f"rank {rank} ran checks {report['checks']}, expected {list(checks)}")
        assert report["comparisons"], f"rank {rank} compared nothing"
        for what, got, expected, detail in report["comparisons"]:
            total += 1
            if got != expected:
                wrong.append(f"rank {rank}: {what}: expected {expected}, got {got}" + (f"; {detail}" if detail else ""))
    more = f"\n... and {len(wrong) - shown} more" if len(wrong) > shown else ""
    assert not wrong, f"{len(wrong)} of {total} comparisons differ:\n" + "\n".join(wrong[:shown]) + more
    return total
