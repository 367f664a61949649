"""Checks written as (what, got, relation, expected), turned into ``comparisons.Comparisons``.

Some checks are bounds rather than equalities (a peak at most so many bytes, a tolerance ratio at
most 1); a body lists them as tuples and returns ``report(labels, checks)``, which pytest judges
with ``comparisons.assert_as_expected`` like every other rank body's report.
"""
from tests.mpi_bodies.comparisons import Comparisons

RELATIONS = {"<=": lambda got, bound: got <= bound, "<": lambda got, bound: got < bound, ">": lambda got, bound: got > bound,
             ">=": lambda got, bound: got >= bound,
             "all <=": lambda got, bound: all(value <= bound for value in _values(got)),
             "contains": lambda got, expected: expected in got}


def _values(got):
    return got.values() if isinstance(got, dict) else got


def report(labels, checks):
    """The ``Comparisons`` report of ``checks``: "==" compared exactly, "close" to 1e-12 relative,
    the other relations as a condition that must hold, with both values in its detail."""
    compare = Comparisons()
    compare.checks = list(labels)
    for what, got, relation, expected in checks:
        if relation == "==":
            compare.value(what, got, expected)
        elif relation == "close":
            compare.arrays_close(what, got, expected, rtol=1e-12)
        else:
            compare.true(what, RELATIONS[relation](got, expected), detail=f"got {got}, expected {relation} {expected}")
    return compare.report()
