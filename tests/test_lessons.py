"""Every lesson notebook runs headless from top to bottom, and is stored ready to commit.

A lesson on real MPI ranks starts its cluster with ``minipar.lessons.start_mpi_cluster`` and
stops it in its last cell. If a lesson fails or hangs half way, this test still stops the
cluster: it runs ``stop_mpi_cluster()`` in the kernel, and after the kernel is shut down it
kills whatever is left of the processes the kernel started (engines stuck in a collective
ignore polite signals), so a failing lesson leaves nothing running.
"""
import re
from pathlib import Path

import pytest

from minipar.testing import kill_processes, process_tree

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from nbclient.exceptions import CellExecutionError, CellTimeoutError  # noqa: E402

LESSONS = sorted((Path(__file__).resolve().parent.parent / "lessons").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds; generous because the engines share two cores with everything else
CLEANUP_TIMEOUT = 60
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
STOP_CLUSTERS = "import minipar.lessons\nminipar.lessons.stop_mpi_cluster()"


def uses_mpi_cluster(notebook):
    return any("%%px" in cell.source for cell in notebook.cells if cell.cell_type == "code")


def run_notebook(path, notebook):
    """Execute every cell; on the first failure, pytest.fail with that cell's error."""
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    started_by_kernel = []
    cells = list(notebook.cells)
    try:
        with client.setup_kernel():
            kernel_pid = client.km.provisioner.pid
            try:
                for index, cell in enumerate(cells):
                    try:
                        client.execute_cell(cell, index)
                    except (CellExecutionError, CellTimeoutError) as error:
                        pytest.fail(f"{path.name}: cell {index} failed:\n{ANSI_ESCAPE.sub('', str(error))}",
                                    pytrace=False)
            finally:
                started_by_kernel = [entry for entry in process_tree(kernel_pid) if entry[0] != kernel_pid]
                if uses_mpi_cluster(notebook):
                    client.timeout = CLEANUP_TIMEOUT
                    cleanup = nbformat.v4.new_code_cell(STOP_CLUSTERS)
                    notebook.cells.append(cleanup)
                    try:
                        client.execute_cell(cleanup, len(notebook.cells) - 1)
                    except Exception:  # noqa: BLE001 - a hung kernel; the kill below still cleans up
                        pass
    finally:
        kill_processes(started_by_kernel)  # the kernel is gone; whatever it started and is still alive is stray


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
