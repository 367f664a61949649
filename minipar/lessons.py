"""What the lesson notebooks call: real MPI ranks inside a notebook, and pictures of what they did.

A lesson runs on real ranks through ipyparallel: ``start_mpi_cluster(4)`` launches four
IPython engines as the four ranks of one ``mpiexec`` job (so ``MPI.COMM_WORLD`` spans
them) and a controller that links them to the notebook. A cell that starts with ``%%px``
runs on every rank; any other cell runs in the notebook's own kernel, which is not a rank.

    from minipar.lessons import start_mpi_cluster, stop_mpi_cluster, gather_by_rank
    cluster, ranks = start_mpi_cluster(4)        # first cell
    ...                                          # %%px cells, and gather_by_rank(ranks, "x")
    stop_mpi_cluster()                           # last cell

The cluster is stopped by the last cell, and also when the kernel exits (ipyparallel's
``atexit`` hook), so a lesson abandoned half way leaves nothing behind once its kernel is
shut down. ``execute_notebook`` (used by ``tests/test_lessons.py`` and
``scripts/execute_lessons.py``) goes further for a lesson that fails or hangs: it calls
``stop_mpi_cluster()`` in the kernel, then kills whatever the kernel started that is still
alive (``minipar.testing.process_tree``, ``kill_processes``).
"""
import os
import re
import sys
from pathlib import Path

from minipar._threads import OVERSUBSCRIBED_MPICH, _available_cores
from minipar.comm import collectives
from minipar.testing import find_mpiexec, kill_processes, process_tree

_clusters = []  # started here and not yet stopped


def start_mpi_cluster(ranks=4, timeout=120):
    """Start ``ranks`` engines under one mpiexec; return (cluster, view of the engines in rank order).

    ``%%px`` cells run on that view. Each engine runs one BLAS thread (the ranks share
    the machine's cores) and can import minipar from this source tree.
    """
    import ipyparallel
    from traitlets.config import Config

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"  # read by the engines, which inherit this environment
    if ranks > _available_cores():  # waiting engines sleep instead of spinning (minipar/_threads.py)
        for name, value in OVERSUBSCRIBED_MPICH.items():
            os.environ.setdefault(name, value)
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if package_parent not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, paths)])
    config = Config()
    # The launcher beside this Python belongs to the MPI that mpi4py was built against.
    config.MPILauncher.mpi_cmd = [find_mpiexec(sys.executable)]
    cluster = ipyparallel.Cluster(engines="mpi", n=ranks, config=config, engine_timeout=timeout,
                                  shutdown_atexit=True, log_level=40)
    _clusters.append(cluster)
    try:
        cluster.start_cluster_sync()
        client = cluster.connect_client_sync()
        client.wait_for_engines(ranks, timeout=timeout, interactive=False)
        engine_ranks = client[:].apply_sync(_mpi_rank)
        by_rank = [engine for _, engine in sorted(zip(engine_ranks, client.ids))]
        view = client[by_rank]
        view.block = True
        view.activate()  # registers %px / %%px for this view
    except BaseException:
        stop_mpi_cluster(cluster)
        raise
    print(f"{ranks} MPI ranks ready (engines {by_rank} are ranks 0..{ranks - 1})")
    return cluster, view


def _mpi_rank():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def stop_mpi_cluster(cluster=None):
    """Stop ``cluster`` (default: every cluster started by ``start_mpi_cluster``); safe to repeat.

    Ranks stuck in a collective (one rank raised, the others wait for it) ignore the polite
    signal, so whatever still runs of the engines' process tree afterwards is killed.
    """
    for running in [cluster] if cluster is not None else list(_clusters):
        launched = [getattr(launcher, "pid", None) for launcher in
                    [running.controller, *running.engines.values()] if launcher is not None]
        leftovers = [process for root in launched if root for process in process_tree(root, include_root=True)]
        try:
            running.stop_cluster_sync()
        finally:
            if running in _clusters:
                _clusters.remove(running)
            kill_processes(leftovers)


_STOP_CLUSTERS = "import minipar.lessons\nminipar.lessons.stop_mpi_cluster()"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def uses_mpi_cluster(notebook):
    """Whether a notebook (nbformat) runs cells on MPI ranks (``%%px``)."""
    return any("%%px" in cell.source for cell in notebook.cells if cell.cell_type == "code")


def execute_notebook(notebook, directory, cell_timeout, setup_code=None):
    """Run ``notebook`` (nbformat, changed in place: it gets its outputs) top to bottom in a fresh kernel.

    ``setup_code`` runs silently first when the lesson uses MPI ranks. A failing or timed-out cell
    raises RuntimeError naming the cell, with the error. However the lesson ends, a cluster it
    left running is stopped and whatever the kernel started that is still alive is killed.
    """
    import nbclient
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    on_ranks = uses_mpi_cluster(notebook)
    client = nbclient.NotebookClient(notebook, timeout=cell_timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(directory)}})
    started_by_kernel = []
    try:
        with client.setup_kernel():
            kernel_pid = client.km.provisioner.pid
            try:
                if on_ranks and setup_code:
                    reply = client.wait_for_reply(client.kc.execute(setup_code, silent=True, store_history=False))
                    if reply is None or reply["content"]["status"] != "ok":
                        raise RuntimeError(f"the set-up code failed: {setup_code!r}")
                for index, cell in enumerate(list(notebook.cells)):
                    try:
                        client.execute_cell(cell, index)
                    except (CellExecutionError, CellTimeoutError) as error:
                        raise RuntimeError(f"cell {index} failed:\n{_ANSI_ESCAPE.sub('', str(error))}") from None
            finally:
                started_by_kernel = [entry for entry in process_tree(kernel_pid) if entry[0] != kernel_pid]
                if on_ranks:  # the lesson's last cell stops its cluster; this is for a lesson that failed
                    client.timeout = 60
                    cleanup = nbformat.v4.new_code_cell(_STOP_CLUSTERS)
                    notebook.cells.append(cleanup)
                    try:
                        client.execute_cell(cleanup, len(notebook.cells) - 1)
                    except Exception:  # noqa: BLE001 - a hung kernel; the kill below still cleans up
                        pass
                    notebook.cells.remove(cleanup)  # not part of the lesson
    finally:
        kill_processes(started_by_kernel)  # the kernel is gone; whatever it started and is still alive is stray
    return notebook


def gather_by_rank(view, name):
    """The value of variable ``name`` on every rank, as a list indexed by rank."""
    return view.pull(name, block=True)


# ---- watching a collective step by step ---------------------------------------------------
_PHASES = {collectives._REDUCE_SCATTER_TAG: "reduce-scatter", collectives._ALL_GATHER_TAG: "all-gather"}


class RecordingComm:
    """Stands in for an mpi4py communicator and records every Sendrecv of a ring collective.

    ``collectives.ring_allreduce(RecordingComm(comm.mpi, buffer), buffer)`` runs minipar's
    own ring; before each message the recorder notes the step, the phase, which block of
    ``buffer`` goes out and to whom, and a copy of the whole buffer. ``history`` then holds
    one record per message, and ``buffer`` itself the final state.
    """

    def __init__(self, mpi_comm, buffer):
        self.mpi_comm, self.buffer = mpi_comm, buffer.reshape(-1)
        self.history = []

    def Get_rank(self):  # noqa: N802 - the names mpi4py uses
        return self.mpi_comm.Get_rank()

    def Get_size(self):  # noqa: N802
        return self.mpi_comm.Get_size()

    def Sendrecv(self, outgoing, dest, sendtag, incoming, source, recvtag):  # noqa: N802
        start = (outgoing.__array_interface__["data"][0] - self.buffer.__array_interface__["data"][0])
        start //= self.buffer.itemsize
        blocks = collectives.block_bounds(self.buffer.size, self.Get_size())
        phase = _PHASES.get(sendtag, str(sendtag))
        self.history.append({
            "step": sum(record["phase"] == phase for record in self.history),
            "phase": phase,
            "sent_block": next(index for index, (first, _) in enumerate(blocks) if first == start),
            "to": dest,
            "from": source,
            "before": self.buffer.copy(),
        })
        return self.mpi_comm.Sendrecv(outgoing, dest, sendtag, incoming, source, recvtag)


def draw_ring_steps(histories, finals, title="ring allreduce, step by step", value_format="{:g}".format):
    """One small ring per message round: each rank's buffer, and the block it sends to the right.

    ``histories[r]`` is rank r's ``RecordingComm.history``, ``finals[r]`` its final buffer;
    ``value_format`` turns one buffer element into text.
    """
    import math

    import matplotlib.pyplot as plt

    size, rounds = len(histories), len(histories[0])
    columns = min(rounds + 1, 4)
    rows = math.ceil((rounds + 1) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    angles = [math.pi / 2 - 2 * math.pi * r / size for r in range(size)]
    points = [(math.cos(a), math.sin(a)) for a in angles]
    for panel, axis in enumerate(axes.flat):
        axis.set_axis_off()
        if panel > rounds:
            continue
        axis.set_xlim(-2.6, 2.6)
        axis.set_ylim(-1.7, 1.7)
        final = panel == rounds
        record = None if final else histories[0][panel]
        axis.set_title("result" if final else f"{record['phase']} step {record['step']}", fontsize=10)
        for rank, (x, y) in enumerate(points):
            state = finals[rank] if final else histories[rank][panel]["before"]
            axis.add_patch(plt.Circle((x, y), 0.16, color="tab:blue", alpha=0.85))
            axis.text(x, y, str(rank), ha="center", va="center", color="white", fontweight="bold")
            label = " ".join(value_format(value) for value in state)
            side = "left" if x > 0.3 else "right" if x < -0.3 else "center"
            axis.text(x + 0.22 * (side == "left") - 0.22 * (side == "right"), y + 0.3 * (side == "center") * y,
                      label, ha=side, va="center", fontsize=8, family="monospace")
            if final:
                continue
            block = histories[rank][panel]["sent_block"]
            x2, y2 = points[histories[rank][panel]["to"]]
            axis.annotate("", xy=(x2 * 0.8 + x * 0.2, y2 * 0.8 + y * 0.2),
                          xytext=(x * 0.8 + x2 * 0.2, y * 0.8 + y2 * 0.2),
                          arrowprops=dict(arrowstyle="->", color="tab:red"))
            axis.text((x + x2) / 2 * 0.75, (y + y2) / 2 * 0.75, f"b{block}", color="tab:red", fontsize=8,
                      ha="center", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    return figure
