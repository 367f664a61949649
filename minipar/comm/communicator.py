"""The Communicator: every byte minipar moves between ranks goes through here.

``Communicator(mpi_comm=None)`` wraps an mpi4py communicator (COMM_WORLD by
default) and offers

- ``rank``, ``size``, ``mpi`` (the raw communicator), ``split(color, key)``,
  ``barrier()``;
- point to point: ``send``, ``recv``, ``sendrecv``, ``isend``, ``irecv``;
- collectives: ``allreduce``, ``allgather``, ``scatter``, ``reduce_scatter``, ``broadcast``,
  ``reduce``; nonblocking ``iallreduce``, ``ireduce_scatter``, ``iallgather`` (``nonblocking.py``);
  ``alltoall``, ``alltoallv`` and ``exchange_counts`` (``alltoall.py``). ``algorithm="mpi"`` calls
  MPI's built-in; the other names run the hand-built versions in
  ``minipar.comm.collectives``, which give the same results.

Arrays are backend (``xp``) arrays, C-contiguous, moved with MPI's buffer
methods into caller-given arrays: nothing is pickled. With NumPy they go to
mpi4py as they are; with a GPU backend a transport (``minipar.comm.transport``:
``staged``, ``cuda-aware`` or ``nccl``, chosen per Communicator with
``transport=`` or ``MINIPAR_TRANSPORT`` and inherited by ``split``) moves them,
offering the same buffer methods on device arrays as ``self.wire``.

Counters. ``comm.counters[name]`` holds, for this rank, ``calls``,
``elements`` (total elements of the data the calls were about: the full,
gathered size for ``allgather`` and ``reduce_scatter``), ``bytes_sent``,
``bytes_received`` and ``seconds`` (wall time in the calls). Bytes are exact
for point to point and for the hand-built collectives (every message is
counted). MPI does not report what its built-ins move, so for
``algorithm="mpi"`` they record the textbook volume of the ring (allreduce
$2(N−1)/N·n$, allgather and reduce-scatter $(N−1)/N·n$) or of the binomial tree
(broadcast, reduce) or of the direct exchange (alltoall, alltoallv: every block
but one's own, each way) — a model, not a measurement. Non-blocking calls
(``isend``, ``irecv``, ``iallreduce``) count their bytes when posted and their
seconds as the time blocked in posting and waiting.

Listeners. ``comm.add_listener(fn)`` has ``fn(name, start, end, nbytes)``
called after every call (at ``wait()`` for non-blocking ones), with
``time.perf_counter`` times and ``nbytes`` the size of the data the call was
given (the $n$ of the cost formulas), for tracing timelines.
"""
import numbers
import time

from mpi4py import MPI

from minipar.comm import collectives, tree_collectives
from minipar.comm.alltoall import AllToAll
from minipar.comm.arguments import MPI_OPS, check_array, check_choice, check_out_matches
from minipar.comm.compression import bf16_ring_allreduce, fp16_ring_allreduce
from minipar.comm.nonblocking import NonblockingCollectives
from minipar.comm.records import Bookkeeping, Counters, Request
from minipar.comm.traffic import Traffic, modelled_traffic
from minipar.comm.transport import check_transport, default_transport, make_wire
from minipar.errors import ConfigError, ShapeError

_ALLREDUCE_ALGORITHMS = {
    "ring": collectives.ring_allreduce,
    "recursive_doubling": collectives.recursive_doubling_allreduce,
    "tree": tree_collectives.tree_allreduce,
    "ring_fp16": fp16_ring_allreduce,  # lossy: 16-bit messages (comm/compression.py)
    "ring_bf16": bf16_ring_allreduce,
}


class Communicator(Bookkeeping, NonblockingCollectives, AllToAll):
    """Buffer methods, counters and listeners over one MPI communicator (module docstring); the
    nonblocking collectives come from ``nonblocking.py``, the all-to-alls from ``alltoall.py``, the
    counters and listeners from ``records.py``."""

    def __init__(self, mpi_comm=None, transport=None):
        self.mpi = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.transport = default_transport() if transport is None else transport
        check_transport(self.transport, self.mpi)
        self.wire = make_wire(self.transport, self.mpi)  # buffer methods that take backend arrays
        self.counters = Counters()
        self._listeners = []

    def __repr__(self):
        return f"Communicator(rank={self.rank}, size={self.size})"

    @property
    def world_size(self):
        """Ranks in the whole MPI job (COMM_WORLD), of which this communicator may be a group.

        For validating a layout against the job it runs in; no message moves.
        """
        return MPI.COMM_WORLD.Get_size()

    # ---- bookkeeping (counters and listeners: records.Bookkeeping) -----------------------

    def _modelled(self, name, array_size, itemsize, root=0):
        return modelled_traffic(name, self.rank, self.size, array_size, itemsize, root)

    def _check_root(self, root, call):
        if not isinstance(root, numbers.Integral) or not 0 <= root < self.size:
            raise ConfigError(f"{call}: root must be a rank in 0..{self.size - 1}, got {root!r}")

    # ---- groups ----------------------------------------------------------------------

    def split(self, color, key=0):
        """A new Communicator over the ranks that pass the same ``color``, ordered by ``key``."""
        return Communicator(self.mpi.Split(color, key), self.transport)

    def barrier(self):
        started = time.perf_counter()
        self.mpi.Barrier()
        self._account("barrier", 0, Traffic(), started, 0)

    # ---- point to point ----------------------------------------------------------------

    def send(self, array, dest, tag=0):
        check_array(array, "array", "send")
        started = time.perf_counter()
        self.wire.Send(array, dest, tag)
        self._account("send", array.size, Traffic(array.nbytes, 0), started, array.nbytes)

    def recv(self, out, source, tag=0):
        check_array(out, "out", "recv", writable=True)
        started = time.perf_counter()
        self.wire.Recv(out, source, tag)
        self._account("recv", out.size, Traffic(0, out.nbytes), started, out.nbytes)
        return out

    def sendrecv(self, send_array, dest, recv_out, source, tag=0):
        """Send to ``dest`` and receive from ``source`` at once (no deadlock in a ring)."""
        check_array(send_array, "send_array", "sendrecv")
        check_array(recv_out, "recv_out", "sendrecv", writable=True)
        started = time.perf_counter()
        self.wire.Sendrecv(send_array, dest, tag, recv_out, source, tag)
        traffic = Traffic(send_array.nbytes, recv_out.nbytes)
        self._account("sendrecv", send_array.size, traffic, started, send_array.nbytes)
        return recv_out

    def isend(self, array, dest, tag=0):
        """Start sending ``array``; do not modify it until the request's ``wait()`` returns."""
        check_array(array, "array", "isend")
        started = time.perf_counter()
        mpi_request = self.wire.Isend(array, dest, tag)
        self._account("isend", array.size, Traffic(array.nbytes, 0), started, 0, notify=False)
        return Request(self, "isend", mpi_request, None, array, array.nbytes, started)

    def irecv(self, out, source, tag=0):
        """Start receiving into ``out``; its contents are valid once ``wait()`` returns."""
        check_array(out, "out", "irecv", writable=True)
        started = time.perf_counter()
        mpi_request = self.wire.Irecv(out, source, tag)
        self._account("irecv", out.size, Traffic(0, out.nbytes), started, 0, notify=False)
        return Request(self, "irecv", mpi_request, None, out, out.nbytes, started)

    # ---- collectives -------------------------------------------------------------------

    def allreduce(self, array, out=None, op="sum", algorithm="mpi"):
        """Reduce ``array`` over all ranks into ``out`` (into ``array`` itself when ``out`` is None).

        ``op``: "sum" or "max". ``algorithm``: "mpi", "ring", "recursive_doubling"
        or "tree". Returns the array holding the result.
        """
        check_choice(op, MPI_OPS, "op", "allreduce")
        check_choice(algorithm, {"mpi", *_ALLREDUCE_ALGORITHMS}, "algorithm", "allreduce")
        if out is array:
            out = None  # MPI forbids the same buffer as both input and output: that is in place
        check_array(array, "array", "allreduce", writable=out is None)
        if out is not None:
            check_out_matches(array, out, "allreduce")
        result = array if out is None else out
        started = time.perf_counter()
        if algorithm == "mpi":
            self.wire.Allreduce(MPI.IN_PLACE if out is None else array, result, MPI_OPS[op])
            traffic = self._modelled("allreduce", array.size, array.itemsize)
        else:
            if out is not None:
                out[...] = array
            traffic = _ALLREDUCE_ALGORITHMS[algorithm](self.wire, result, op)
        self._account("allreduce", array.size, traffic, started, array.nbytes)
        return result

    def allgather(self, send, out, algorithm="mpi"):
        """Concatenate every rank's ``send`` along the first axis, in rank order, into ``out``.

        ``out.shape`` must be ``(size * send.shape[0], *send.shape[1:])``.
        ``algorithm``: "mpi" or "ring".
        """
        check_choice(algorithm, {"mpi", "ring"}, "algorithm", "allgather")
        self._check_gather_shapes(piece=send, whole=out, call="allgather")
        started = time.perf_counter()
        if algorithm == "mpi":
            self.wire.Allgather(send, out)
            traffic = self._modelled("allgather", out.size, out.itemsize)
        else:
            rows = send.shape[0]
            out[self.rank * rows:(self.rank + 1) * rows] = send  # the ring starts from our own block
            traffic = collectives.ring_all_gather(self.wire, out)
        self._account("allgather", out.size, traffic, started, out.nbytes)
        return out

    def scatter(self, send, out, root=0):
        """Rank r receives block r of the root's ``send`` (cut along the first axis) into ``out``.

        ``send`` matters on the root only (others may pass None); its shape there must be
        ``(size * out.shape[0], *out.shape[1:])``. MPI's built-in; the root sends $(N−1)/N$ of it.
        """
        self._check_root(root, "scatter")
        started = time.perf_counter()
        if self.rank == root:
            self._check_gather_shapes(piece=out, whole=send, call="scatter")
        self.wire.Scatter(send if self.rank == root else None, out, root=root)
        sent = out.nbytes * (self.size - 1) if self.rank == root else 0
        traffic = Traffic(sent, 0 if self.rank == root else out.nbytes)
        self._account("scatter", out.size * self.size, traffic, started, out.nbytes * self.size)
        return out

    def reduce_scatter(self, send, out, op="sum", algorithm="mpi"):
        """Reduce ``send`` over all ranks and keep block ``rank`` of the first axis in ``out``.

        ``send.shape`` must be ``(size * out.shape[0], *out.shape[1:])``.
        ``algorithm``: "mpi" or "ring".
        """
        check_choice(op, MPI_OPS, "op", "reduce_scatter")
        check_choice(algorithm, {"mpi", "ring"}, "algorithm", "reduce_scatter")
        self._check_gather_shapes(piece=out, whole=send, call="reduce_scatter")
        started = time.perf_counter()
        if algorithm == "mpi":
            self.wire.Reduce_scatter_block(send, out, MPI_OPS[op])
            traffic = self._modelled("reduce_scatter", send.size, send.itemsize)
        else:
            working_copy = send.copy()  # the ring reduces in place; leave send intact
            traffic = collectives.ring_reduce_scatter(self.wire, working_copy, op)
            rows = out.shape[0]
            out[...] = working_copy[self.rank * rows:(self.rank + 1) * rows]
        self._account("reduce_scatter", send.size, traffic, started, send.nbytes)
        return out

    def _check_gather_shapes(self, piece, whole, call):
        check_array(piece, "the per-rank array", call, writable=call == "reduce_scatter")
        check_array(whole, "the full array", call, writable=call == "allgather")
        stacked = piece.ndim > 0 and whole.shape == (self.size * piece.shape[0], *piece.shape[1:])
        if not stacked or piece.dtype != whole.dtype:
            raise ShapeError(
                f"{call}: the full array must be the {self.size} per-rank arrays stacked along the first "
                f"axis; got per-rank {piece.dtype} {piece.shape} and full {whole.dtype} {whole.shape}"
            )

    def broadcast(self, array, root=0, algorithm="mpi"):
        """Copy ``array`` on ``root`` into ``array`` on every rank. ``algorithm``: "mpi" or "tree"."""
        check_choice(algorithm, {"mpi", "tree"}, "algorithm", "broadcast")
        self._check_root(root, "broadcast")
        check_array(array, "array", "broadcast", writable=True)
        started = time.perf_counter()
        if algorithm == "mpi":
            self.wire.Bcast(array, root)
            traffic = self._modelled("broadcast", array.size, array.itemsize, root)
        else:
            traffic = tree_collectives.tree_broadcast(self.wire, array, root)
        self._account("broadcast", array.size, traffic, started, array.nbytes)
        return array

    def reduce(self, array, out, root=0, op="sum", algorithm="mpi"):
        """Reduce ``array`` over all ranks into ``out`` on ``root``.

        ``out`` is needed on the root only (pass None elsewhere). Returns ``out``.
        ``algorithm``: "mpi" or "tree".
        """
        check_choice(op, MPI_OPS, "op", "reduce")
        check_choice(algorithm, {"mpi", "tree"}, "algorithm", "reduce")
        self._check_root(root, "reduce")
        check_array(array, "array", "reduce")
        is_root = self.rank == root
        if is_root and out is None:
            raise ShapeError("reduce: the root rank must pass an out array for the result")
        if out is not None:
            check_out_matches(array, out, "reduce")
        started = time.perf_counter()
        if algorithm == "mpi":
            self.wire.Reduce(array, out if is_root else None, MPI_OPS[op], root)
            traffic = self._modelled("reduce", array.size, array.itemsize, root)
        else:
            working = out if is_root else array.copy()  # tree reduce works in place
            if is_root:
                working[...] = array
            traffic = tree_collectives.tree_reduce(self.wire, working, root, op)
        self._account("reduce", array.size, traffic, started, array.nbytes)
        return out

