"""The Communicator's all-to-all: every rank sends a different block to every other rank.

Expert parallelism's dispatch and combine (``parallel/expert_parallel.py``): ``alltoall`` moves
equal blocks, ``alltoallv`` uneven ones whose sizes each rank learns first with
``exchange_counts``. ``algorithm="mpi"`` calls ``MPI_Alltoall(v)``; "pairwise" runs the hand-built
exchange (``collectives.pairwise_alltoall``), which the GPU wires use for "mpi" too. Each rank sends
and receives every block but its own: $(N−1)/N$ of the $n$ elements when the blocks are equal.
"""
import time

from minipar.comm import collectives
from minipar.comm.arguments import check_array, check_choice
from minipar.comm.traffic import alltoall_traffic, bounds_from_counts
from minipar.errors import ShapeError


class AllToAll:
    """Mixed into ``Communicator``: uses its ``wire``, ``mpi``, ``rank``, ``size`` and ``_account``."""

    def alltoall(self, send, out, algorithm="mpi"):
        """Block j of ``send`` goes to rank j; block i of ``out`` arrives from rank i.

        The first axis of ``send`` is cut into ``size`` equal blocks, and ``out`` has the same
        shape and dtype. ``algorithm``: "mpi" (``MPI_Alltoall``) or "pairwise" (the hand-built
        exchange in ``minipar.comm.collectives``). Each rank sends and receives $(N−1)/N$ of the $n$
        elements.
        """
        check_choice(algorithm, {"mpi", "pairwise"}, "algorithm", "alltoall")
        check_array(send, "send", "alltoall")
        check_array(out, "out", "alltoall", writable=True)
        if send.ndim == 0 or send.shape[0] % self.size or out.shape != send.shape or out.dtype != send.dtype:
            raise ShapeError(f"alltoall: send must have a first axis divisible by the {self.size} ranks and out its "
                             f"shape and dtype; got send {send.dtype} {send.shape} and out {out.dtype} {out.shape}")
        block = send.size // self.size
        bounds = [(j * block, (j + 1) * block) for j in range(self.size)]
        return self._alltoall("alltoall", send, out, bounds, bounds, algorithm)

    def alltoallv(self, send, send_counts, out, receive_counts, algorithm="mpi"):
        """Rows ``send_counts[j]`` of ``send`` (consecutive, in rank order) go to rank j; the
        ``receive_counts[i]`` rows from rank i land in ``out``, in rank order.

        Counts are rows of the first axis; the other axes of ``send`` and ``out`` must match.
        ``receive_counts`` must be what the others send this rank (``exchange_counts`` finds it).
        ``algorithm``: "mpi" (``MPI_Alltoallv``) or "pairwise".
        """
        check_choice(algorithm, {"mpi", "pairwise"}, "algorithm", "alltoallv")
        check_array(send, "send", "alltoallv")
        check_array(out, "out", "alltoallv", writable=True)
        send_counts, receive_counts = [int(c) for c in send_counts], [int(c) for c in receive_counts]
        if len(send_counts) != self.size or len(receive_counts) != self.size or min(send_counts + receive_counts) < 0:
            raise ShapeError(f"alltoallv: send_counts and receive_counts need one count >= 0 per rank ({self.size}), "
                             f"got {send_counts} and {receive_counts}")
        if (send.ndim == 0 or out.ndim == 0 or send.shape[1:] != out.shape[1:] or send.dtype != out.dtype
                or send.shape[0] != sum(send_counts) or out.shape[0] != sum(receive_counts)):
            raise ShapeError(f"alltoallv: send {send.dtype} {send.shape} must hold sum(send_counts) = {sum(send_counts)} "
                             f"rows and out {out.dtype} {out.shape} sum(receive_counts) = {sum(receive_counts)}, "
                             "with the same dtype and row shape")
        row = 1
        for extent in send.shape[1:]:
            row *= extent
        send_bounds = bounds_from_counts(send_counts, row)
        receive_bounds = bounds_from_counts(receive_counts, row)
        return self._alltoall("alltoallv", send, out, send_bounds, receive_bounds, algorithm)

    def _alltoall(self, name, send, out, send_bounds, receive_bounds, algorithm):
        started = time.perf_counter()
        # The GPU wires (staged, NCCL) offer no Alltoall(v): there "mpi" runs the pairwise exchange too.
        if algorithm == "pairwise" or not hasattr(self.wire, "Alltoallv"):
            traffic = collectives.pairwise_alltoall(self.wire, send, out, send_bounds, receive_bounds)
        else:
            def spec(array, bounds):
                counts = [stop - start for start, stop in bounds]
                return [array, (counts, [start for start, _ in bounds])]

            if name == "alltoall":
                self.wire.Alltoall(send, out)
            else:
                self.wire.Alltoallv(spec(send, send_bounds), spec(out, receive_bounds))
            traffic = alltoall_traffic(self.rank, send_bounds, receive_bounds, send.itemsize)
        self._account(name, send.size, traffic, started, send.nbytes)
        return out

    def exchange_counts(self, send_counts):
        """What every rank sends this one, given what this one sends each rank (a list of ints):
        the metadata an ``alltoallv`` needs first, N small integers, so pickled (mpi4py's
        lower-case ``alltoall``) rather than moved through buffers. Not counted as traffic."""
        counts = [int(c) for c in send_counts]
        if len(counts) != self.size:
            raise ShapeError(f"exchange_counts: one count per rank ({self.size}) needed, got {counts}")
        return [int(c) for c in self.mpi.alltoall(counts)]
