"""Execute the lesson notebooks for the documentation site, on real MPI ranks, into build/lessons/.

    python scripts/execute_lessons.py                 # every lesson (several minutes on 2 cores)
    python scripts/execute_lessons.py 05 07           # only the lessons whose names start so

Each lesson runs top to bottom in a fresh kernel, as ``tests/test_lessons.py`` runs it; lessons 2-9,
11 and 12 start their ipyparallel MPI engines through ``minipar.lessons.start_mpi_cluster``. The executed copy
goes to ``build/lessons/NAME.ipynb`` (``build/`` is ignored by git, so outputs are never committed)
and records a digest of the lesson's cells. ``mkdocs build`` shows the executed copy when its digest
matches the lesson in ``lessons/``; when the lesson changed since, the strict build fails and names
this command, so a stale figure never reaches the site. A lesson that raises, or a cell that runs
longer than ``--cell-timeout`` seconds, ends the command with the lesson, the cell and the error, and
whatever the kernel started (engines stuck in a collective) is killed.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
EXECUTED = ROOT / "build" / "lessons"
# Run silently before the lesson (no execution count, nothing stored): a %%px cell shows a text progress
# bar after 2 s, which a static page would keep as dozens of "%px: 0%|" lines. Only the display changes.
NO_PROGRESS_BARS = "import ipyparallel.client.magics\nipyparallel.client.magics.ParallelMagics.progress_after_seconds = -1"


def source_digest(notebook):
    """SHA-256 of the cells' types and sources: what the lesson says, whatever its outputs."""
    cells = [[cell["cell_type"], "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]]
             for cell in notebook["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def execute(path, cell_timeout):
    """Run the notebook at ``path``; return it with its outputs. Raises RuntimeError naming the failing cell."""
    import nbformat

    from minipar.lessons import execute_notebook

    try:
        return execute_notebook(nbformat.read(path, as_version=4), path.parent, cell_timeout, NO_PROGRESS_BARS)
    except RuntimeError as error:
        raise RuntimeError(f"{path.name}: {error}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prefixes", nargs="*", help="run only the lessons whose file names start with these")
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds one cell may run (default 600)")
    args = parser.parse_args(argv)

    import nbformat

    lessons = sorted(LESSONS.glob("*.ipynb"))
    if args.prefixes:
        lessons = [path for path in lessons if path.name.startswith(tuple(args.prefixes))]
        if not lessons:
            parser.error(f"no lesson in {LESSONS} starts with {' or '.join(args.prefixes)}")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    EXECUTED.mkdir(parents=True, exist_ok=True)
    for path in lessons:
        started = time.perf_counter()
        print(f"executing {path.relative_to(ROOT)} ...", flush=True)
        try:
            notebook = execute(path, args.cell_timeout)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
        notebook.metadata["minipar"] = {"source_digest": source_digest(json.loads(path.read_text())),
                                        "executed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        target = EXECUTED / path.name
        partial = target.with_suffix(".ipynb.partial")
        nbformat.write(notebook, partial)
        partial.replace(target)  # atomic: the site never sees half a notebook
        print(f"  -> {target.relative_to(ROOT)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
