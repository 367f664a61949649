"""Every lesson notebook runs headless from top to bottom, and is stored ready to commit.

A lesson on real MPI ranks starts its cluster with ``minipar.lessons.start_mpi_cluster`` and
stops it in its last cell. If a lesson fails or hangs half way, ``minipar.lessons.execute_notebook``
still stops the cluster: it runs ``stop_mpi_cluster()`` in the kernel, and after the kernel is shut
down it kills whatever is left of the processes the kernel started (engines stuck in a collective
ignore polite signals), so a failing lesson leaves nothing running.
"""
from pathlib import Path

import pytest

from minipar.lessons import execute_notebook, uses_mpi_cluster

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

LESSONS = sorted((Path(__file__).resolve().parent.parent / "lessons").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds; generous because the engines share two cores with everything else


def run_notebook(path, notebook):
    """Execute every cell (minipar.lessons.execute_notebook); on the first failure, pytest.fail with its error."""
    try:
        execute_notebook(notebook, path.parent, CELL_TIMEOUT)
    except RuntimeError as error:
        pytest.fail(f"{path.name}: {error}", pytrace=False)


@pytest.mark.parametrize("path", LESSONS, ids=lambda path: path.name)
def test_lesson_runs(path):
    run_notebook(path, nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", LESSONS, ids=lambda path: path.name)
def test_lesson_is_stored_clean(path):
    """Outputs cleared, and an MPI lesson starts and stops its cluster through minipar.lessons."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    dirty = [index for index, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"
    if uses_mpi_cluster(notebook):
        sources = "\n".join(cell.source for cell in code)
        assert "start_mpi_cluster(" in sources and "ipyparallel" not in sources, (
            f"{path.name}: start the cluster with minipar.lessons.start_mpi_cluster, not ipyparallel directly")
        assert code[-1].source.strip() == "stop_mpi_cluster()", f"{path.name}: the last cell must stop the cluster"
