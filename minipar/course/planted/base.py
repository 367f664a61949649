"""What a corpus entry is, and how it is laid on a copy of the reference tree.

Each ``Planted`` patches a copy of the reference tree: ``old`` (which must occur exactly once
in ``path``) becomes ``new``, the pairs in ``more`` likewise, and each (function, body) of
``regions`` replaces that function's whole solution region.
"""
import textwrap
from dataclasses import dataclass
from pathlib import Path

from minipar.course.checking import CHECK_LIMIT
from minipar.course.markers import replace_regions


@dataclass(frozen=True)
class Planted:
    exercise: str
    name: str          # the mistake, as a student would make it
    path: str
    old: object        # the text to replace, or a tuple of versions of it (the first found once is used)
    new: object        # its replacement, or a tuple matching ``old``
    expect: str        # a fragment of the failure message that points at the mistake ("" for an alternative)
    limit: float = CHECK_LIMIT  # what `course check` gives a student; a planted deadlock may use less
    more: tuple = ()     # further (old, new) replacements in the same file
    regions: tuple = ()  # (qualified function name, new body of its solution region)


def apply(planted, root):
    """Patch the tree at ``root`` in place."""
    path = Path(root) / planted.path
    text = path.read_text()
    for old, new in ((planted.old, planted.new), *planted.more):
        if not old:
            continue
        if isinstance(old, tuple):   # versions of the reference: the first that occurs once, and its new text
            old, new = next(((o, n) for o, n in zip(old, new, strict=True) if text.count(o) == 1), (old[0], new[0]))
        if text.count(old) != 1:
            raise ValueError(f"planted {planted.name!r}: the text to replace occurs {text.count(old)} times "
                             f"in {planted.path}, not once; update the exercise's module in minipar/course/planted/")
        text = text.replace(old, new)
    bodies = dict(planted.regions)
    if bodies:
        def body_for(region):
            if region.function not in bodies:
                return None
            return [region.indent + line if line else "" for line in textwrap.dedent(bodies[region.function])
                    .strip("\n").splitlines()]

        text, regions = replace_regions(text, planted.path, body_for)
        missing = set(bodies) - {region.function for region in regions}
        if missing:
            raise ValueError(f"planted {planted.name!r}: no solution region in {sorted(missing)} of {planted.path}")
    path.write_text(text)


def region(exercise, name, path, bodies, expect, limit=CHECK_LIMIT):
    """A wrong solution or an alternative that rewrites whole solution regions: ``bodies`` {function: code}."""
    return Planted(exercise, name, path, "", "", expect, limit, regions=tuple(bodies.items()))


FUSED, COLLECTIVES, TOPOLOGY = "minipar/ops/fused.py", "minipar/comm/collectives.py", "minipar/parallel/topology.py"
TP_COMM, TP_LAYERS = "minipar/parallel/tensor_parallel_comm.py", "minipar/parallel/tensor_parallel.py"
SCHEDULES = "minipar/parallel/pipeline/schedules.py"
DATA_PARALLEL, ZERO = "minipar/parallel/data_parallel.py", "minipar/parallel/zero.py"
EXECUTOR = "minipar/parallel/pipeline/executor.py"
ZERO_BUBBLE = "minipar/parallel/pipeline/zero_bubble.py"
CONTEXT = "minipar/parallel/context_parallel.py"
