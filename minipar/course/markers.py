"""Solution regions: find them, refuse the unsafe ones, replace them with stubs.

The markers are nbgrader's (``### BEGIN SOLUTION`` / ``### END SOLUTION``, each alone on
its line), so the lesson notebooks also work with ``nbgrader generate_assignment``. The
stub replaces the whole region, markers included, at the region's indentation::

    # YOUR CODE HERE (exercise ring_allreduce, see docs/course/student.md)
    raise NotImplementedError("exercise ring_allreduce: write the body of ring_reduce_scatter ...")

A stub must fail the same way on every rank. A rank that raises while the others wait for
its message leaves them waiting, so a region is refused unless the stub runs on every rank
before any communication:

- in a .py file the region sits directly in a function body (not inside ``if``, ``for``,
  ``while``, ``with`` or ``try``), and no statement before it in that body returns or
  calls a communication method;
- in a notebook cell the region sits at the top level of the cell or directly in a function
  body defined there, under the same rule.

Deciding what "communication" is reads names, not behaviour: a call to any method in
``COMMUNICATION_NAMES`` counts, so a helper that communicates under another name is not seen.
"""
import ast
import re
from dataclasses import dataclass

from minipar.errors import ConfigError

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"

# mpi4py buffer and pickle methods and minipar.comm.Communicator's: calling one before a
# stub would let some ranks start talking while others raise.
COMMUNICATION_NAMES = {
    "Send", "Recv", "Sendrecv", "Isend", "Irecv", "Bcast", "Reduce", "Allreduce", "Allgather",
    "Reduce_scatter", "Reduce_scatter_block", "Barrier", "Split", "Alltoall", "Gather", "Scatter",
    "send", "recv", "isend", "irecv", "sendrecv", "bcast", "allreduce", "allgather", "reduce_scatter",
    "broadcast", "reduce", "barrier", "split", "gather", "scatter", "Wait", "Waitall", "wait",
}
_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)
if hasattr(ast, "TryStar"):
    _COMPOUND = (*_COMPOUND, ast.TryStar)


class MarkerError(ConfigError):
    """A solution region that cannot be turned into a safe stub (the message names file and line)."""


@dataclass(frozen=True)
class Region:
    begin: int       # 1-based line of ``### BEGIN SOLUTION``
    end: int         # 1-based line of ``### END SOLUTION``
    indent: str
    function: str    # qualified name of the enclosing function ("" at the top level of a cell)


def find_regions(source, where):
    """The solution regions of ``source`` in order; ``where`` names the file in errors."""
    regions, begin = [], None
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if begin is not None:
                raise MarkerError(f"{where}:{number}: a solution region begins inside another (line {begin[0]})")
            begin = (number, line[: len(line) - len(line.lstrip())])
        elif stripped == END:
            if begin is None:
                raise MarkerError(f"{where}:{number}: {END} without a {BEGIN} before it")
            regions.append((begin[0], number, begin[1]))
            begin = None
        elif BEGIN.split()[-1] in stripped and "###" in stripped and stripped.startswith("#"):
            raise MarkerError(f"{where}:{number}: write the marker exactly as '{BEGIN}' or '{END}', alone on its line")
    if begin is not None:
        raise MarkerError(f"{where}:{begin[0]}: {BEGIN} has no {END}")
    if not regions:
        return []
    tree = ast.parse(_parsable(source), filename=where)
    return [_checked_region(tree, where, begin, end, indent) for begin, end, indent in regions]


def _parsable(source):
    """A notebook cell with IPython magics (``%%px``, ``%matplotlib``) as parsable Python."""
    return "\n".join("pass  # magic" if line.lstrip().startswith("%") else line for line in source.splitlines())


def _enclosing_functions(tree, line):
    """Qualified name parts and nodes of the functions whose body spans ``line``, outermost first."""
    chain, nodes = [], list(ast.iter_child_nodes(tree))
    found = []
    while nodes:
        node = nodes.pop(0)
        if getattr(node, "lineno", 0) <= line <= getattr(node, "end_lineno", -1):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                chain.append(node.name)
                if not isinstance(node, ast.ClassDef):
                    found.append((".".join(chain), node))
            nodes = list(ast.iter_child_nodes(node))
    return found


def _checked_region(tree, where, begin, end, indent):
    functions = _enclosing_functions(tree, begin)
    if functions:
        name, function = functions[-1]
        body = function.body
    else:
        name, body = "", tree.body
    body_indent = body[0].col_offset if functions else 0
    if len(indent) != body_indent or any(
            isinstance(node, _COMPOUND) and node.lineno < begin <= node.end_lineno for node in body):
        raise MarkerError(
            f"{where}:{begin}: the solution region must sit directly in the body of "
            f"{name or 'the cell'}, not inside if/for/while/with/try: a stub there would raise on some ranks "
            "only and leave the others waiting")
    for node in body:
        if node.end_lineno >= begin:
            break
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Return, ast.Yield, ast.YieldFrom)) and functions:
                raise MarkerError(f"{where}:{inner.lineno}: {name} may return before its solution region "
                                  f"(line {begin}), so the stub would not run on every rank")
            called = getattr(getattr(inner, "func", None), "attr", None) if isinstance(inner, ast.Call) else None
            if called in COMMUNICATION_NAMES:
                raise MarkerError(f"{where}:{inner.lineno}: {name or 'the cell'} calls {called}() before its "
                                  f"solution region (line {begin}); put the region first so the stub raises "
                                  "before any rank communicates")
    return Region(begin, end, indent, name)


def stub_lines(indent, exercise, what):
    """The two lines that replace a region."""
    message = f"exercise {exercise}: {what}"
    return [f"{indent}# YOUR CODE HERE (exercise {exercise}, see docs/course/student.md)",
            f"{indent}raise NotImplementedError({message!r})"]


def replace_regions(source, where, stub_for):
    """``source`` with each region replaced by ``stub_for(region)``'s lines (None: left as it is);
    returns (text, regions)."""
    regions = find_regions(source, where)
    lines = source.splitlines()
    for region in reversed(regions):
        stub = stub_for(region)
        if stub is not None:
            lines[region.begin - 1: region.end] = stub
    text = "\n".join(lines)
    if source.endswith("\n"):
        text += "\n"
    return text, regions


_EXERCISE_LABEL = re.compile(r"EXERCISE\s+(\d+\.\d+)")


def notebook_exercise_label(cell_source, notebook_name):
    """``"2.1"`` for a cell mentioning ``EXERCISE 2.1``; else the notebook's name."""
    match = _EXERCISE_LABEL.search(cell_source)
    return match.group(1) if match else notebook_name


def stub_notebook(notebook, notebook_name):
    """Replace the solution regions of every code cell in place; returns the labels stubbed."""
    labels = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or BEGIN not in cell.source:
            continue
        label = notebook_exercise_label(cell.source, notebook_name)

        def stub_for(region, label=label):
            what = (f"write the body of {region.function}" if region.function else "write the missing code")
            return stub_lines(region.indent, label, f"{what} in {notebook_name}, then run the cell again")

        cell.source, _ = replace_regions(cell.source, f"{notebook_name} cell {index}", stub_for)
        labels.append(label)
    return labels
