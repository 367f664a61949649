"""Rank bodies report values; pytest compares them (expected against got).

A body calls ``report(world, value)`` on rank 0 (one JSON line: floats survive JSON exactly) or
``report_checks(world, label, checks)`` with checks ``(what, got, relation, expected)`` from
every rank; the test reads them back with ``results(output)`` or ``assert_checks(output, labels)``,
so a failure names what broke and shows both values instead of a missing confirmation line.
"""
import json

import pytest

RESULT = "result: "

RELATIONS = {"==": lambda got, expected: got == expected, "<=": lambda got, bound: got <= bound,
             "<": lambda got, bound: got < bound, ">=": lambda got, bound: got >= bound,
             "all <=": lambda got, bound: all(value <= bound for value in (got.values() if isinstance(got, dict) else got)),
             "close": lambda got, expected: got == pytest.approx(expected, rel=1e-12, abs=0),
             "contains": lambda got, expected: expected in got}


def report(world, value):
    """Rank 0 prints ``value`` as one JSON line for pytest."""
    if world.rank == 0:
        print(RESULT + json.dumps(value), flush=True)


def report_checks(world, label, checks):
    """Rank 0 reports {"label": ..., "checks": [[what, got, relation, expected], ...]} with the
    checks of every rank (gathered as small metadata)."""
    everyone = world.mpi.gather(checks, root=0)
    if world.rank == 0:
        report(world, {"label": label, "checks": [check for rank_checks in everyone for check in rank_checks]})


def results(output):
    """The values rank 0 reported, in order."""
    return [json.loads(line[len(RESULT):]) for line in output.splitlines() if line.startswith(RESULT)]


def assert_checks(output, labels):
    """Exactly ``labels`` were reported, each with at least one check, and every check holds."""
    reported = results(output)
    assert [r["label"] for r in reported] == labels, output
    for r in reported:
        assert r["checks"], r["label"]
        for what, got, relation, expected in r["checks"]:
            assert RELATIONS[relation](got, expected), f"{r['label']}: {what}: got {got}, expected {relation} {expected}"
