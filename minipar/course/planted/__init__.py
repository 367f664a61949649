"""The corpus: realistic wrong solutions that every check must catch, and correct variants it must pass.

One module per exercise (named after it) holds ``WRONG`` and ``ALTERNATIVES``; ``base.py`` says
what an entry is and lays it on a copy of the reference tree. ``tests/test_course.py`` and
``python -m minipar.course.corpus`` grade the copy: a wrong solution (``PLANTED``) must fail
some check with ``expect`` in the report, the words that point at the mistake; an alternative
(``ALTERNATIVES``, ``expect`` empty) must pass every check. Teacher-only: left out of the
student version.

The kinds of mistake, as the course's students make them: an ordering that can deadlock, a
built-in in place of the algorithm, state not reset across steps, a changed dtype, sizes not
divisible by N, other ranks' gradients wrong, buffer aliasing, no overlap, and a near miss (a
result off by about 1e-9 relative, which a tolerance 1,000 times looser than the grader's
would pass).
"""
import importlib

from minipar.course.planted.base import Planted, apply, region
from minipar.course.registry import EXERCISES


def corpus_of(name):
    """The module holding exercise ``name``'s wrong solutions and alternatives."""
    return importlib.import_module(f"minipar.course.planted.{name}")


PLANTED = tuple(planted for exercise in EXERCISES for planted in corpus_of(exercise.name).WRONG)
ALTERNATIVES = tuple(planted for exercise in EXERCISES for planted in corpus_of(exercise.name).ALTERNATIVES)

__all__ = ["ALTERNATIVES", "PLANTED", "Planted", "apply", "corpus_of", "region"]
