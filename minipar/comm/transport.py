"""How arrays on a GPU reach the other ranks: the three transports behind the Communicator.

MPI reads and writes memory through pointers. With NumPy those point at host memory and
the Communicator hands arrays to mpi4py as they are. With a device backend an array lives in
GPU memory, and there are three ways to move it (ChainerMN's ``naive``, ``flat`` and
``pure_nccl`` communicators made the same choice):

- ``staged`` (default, works with any MPI, including the ``mpich`` wheel): copy the array
  into a page-locked host buffer, let MPI move the host buffer, copy what arrived back onto
  the device. Buffers come from a pool and are reused, so a step allocates none after the
  first. Each message costs one device-to-host copy where it is sent and one
  host-to-device copy where it arrives, counted by ``minipar.backend.copy_counts``
  (``minipar.comm.transport_staged``).
- ``cuda-aware``: device pointers go to MPI directly (mpi4py understands CuPy arrays).
  Only an MPI built with CUDA support can do this; one that is not crashes rather than
  complains, so it is chosen only when the library reports support
  (``MPIX_Query_cuda_support``, offered by Open MPI and MPICH) or the user forces it
  (``MINIPAR_FORCE_CUDA_AWARE=1``).
- ``nccl``: NVIDIA's collective library, through ``cupy.cuda.nccl``: one NCCL communicator
  per process group, built from a unique id that rank 0 broadcasts over MPI. NCCL refuses
  two ranks of one communicator on the same GPU, so it needs a GPU per rank.

Every transport offers the mpi4py buffer methods the Communicator and the hand-built
collectives call (``Send``, ``Recv``, ``Sendrecv``, ``Isend``, ``Irecv``, ``Allreduce``,
``Iallreduce``, ``Allgather``, ``Reduce_scatter_block``, ``Bcast``, ``Reduce``, ``Scatter``),
taking device arrays. So ring, tree and recursive doubling, built from point to point, run
over all three unchanged, and the traffic counters, kept by the Communicator from array
sizes, are identical whichever moves the bytes.
"""
import ctypes
import os
from collections import Counter

from mpi4py import MPI

from minipar import backend
from minipar.comm.transport_staged import LoneStagedWire, StagedWire
from minipar.errors import ConfigError

TRANSPORT_NAMES = ("staged", "cuda-aware", "nccl")


# ---- choosing ---------------------------------------------------------------------------

def mpi_reports_cuda_support():
    """True if the MPI library says it can read GPU memory (``MPIX_Query_cuda_support``).

    mpi4py does not wrap this extension, so it is looked up in the loaded MPI library.
    False when the library lacks it (then support is unknown, and we do not gamble).
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi" in line}
    except OSError:
        return False
    for path in sorted(paths):
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        if query is not None:
            return bool(query())
    return False


def transport_problem(name, backend_name, cuda_aware_mpi, nccl_available, ranks_per_gpu, force=False):
    """Why transport ``name`` cannot run here (one sentence), or None if it can."""
    if name not in TRANSPORT_NAMES:
        return f"transport must be one of {', '.join(TRANSPORT_NAMES)}; got {name!r}"
    if name == "staged":
        return None
    if backend_name == "numpy":
        return f"transport {name} moves GPU memory, but the backend is numpy (use --backend cupy)"
    if name == "cuda-aware" and not (cuda_aware_mpi or force):
        return ("transport cuda-aware: this MPI does not report CUDA support (MPIX_Query_cuda_support), "
                "and handing it GPU memory would crash; use staged, or force it if you know better")
    if name == "cuda-aware" and backend_name == "devicesim":
        return "transport cuda-aware needs real GPU memory; devicesim arrays refuse MPI, as a non-CUDA MPI would"
    if name == "nccl" and not nccl_available:
        return "transport nccl needs CuPy built with NCCL (cupy.cuda.nccl) on a GPU"
    if name == "nccl" and ranks_per_gpu > 1:
        return f"transport nccl cannot put {ranks_per_gpu} ranks on one GPU (NCCL refuses duplicates); use staged"
    return None


def _nccl_available():
    if backend.BACKEND_NAME != "cupy":
        return False
    try:  # pragma: no cover - needs a GPU
        from cupy.cuda import nccl

        return bool(nccl.available)
    except ImportError:
        return False


def check_transport(name, mpi_comm, force=False):
    """Raise ConfigError on every rank alike if ``name`` cannot run on ``mpi_comm``."""
    if name == "staged":
        return  # runs everywhere: no need to ask the other ranks
    force = force or os.environ.get("MINIPAR_FORCE_CUDA_AWARE") == "1"
    # Which GPU each rank of this group computes on (node, device): NCCL refuses any twice.
    devices = Counter(mpi_comm.allgather((MPI.Get_processor_name(), backend.current_device())))
    ranks_per_gpu = max(devices.values())
    problem = transport_problem(name, backend.BACKEND_NAME, name == "cuda-aware" and mpi_reports_cuda_support(),
                                _nccl_available(), ranks_per_gpu, force)
    problems = mpi_comm.allgather(problem)  # small metadata: every rank sees every rank's verdict
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise ConfigError(first)


_HOW = {"staged": "device -> pinned host buffer -> MPI -> device", "cuda-aware": "device memory straight to MPI",
        "nccl": "NCCL on the GPUs"}


def describe(transport, placement):
    """The start-up line: backend, where this rank computes, and how its arrays reach MPI."""
    if not backend.ON_DEVICE:
        return f"backend: numpy on the host ({placement.local_size} ranks on this node); MPI reads arrays in place"
    cuda = "yes" if mpi_reports_cuda_support() else "no"
    simulated = " (simulated on the CPU)" if backend.BACKEND_NAME == "devicesim" else ""
    return (f"backend: {backend.BACKEND_NAME}; {placement.describe()}{simulated}; transport: {transport} "
            f"({_HOW[transport]}); MPI reports CUDA support: {cuda}")


def default_transport():
    return os.environ.get("MINIPAR_TRANSPORT", "staged")


def make_wire(name, mpi_comm):
    """What the Communicator calls buffer methods on: ``mpi_comm`` itself when arrays are host memory."""
    if not backend.ON_DEVICE:
        return mpi_comm
    if name == "nccl":  # pragma: no cover - needs GPUs
        from minipar.comm.transport_nccl import NcclWire

        return NcclWire(mpi_comm)
    if name == "staged" and mpi_comm.Get_size() == 1:
        return LoneStagedWire(mpi_comm)
    return {"staged": StagedWire, "cuda-aware": CudaAwareWire}[name](mpi_comm)


# ---- devices per rank -------------------------------------------------------------------

class Placement:
    """Which GPU this rank uses, and how many ranks of its node share each GPU."""

    def __init__(self, device, devices, local_rank, local_size):
        self.device, self.devices, self.local_rank, self.local_size = device, devices, local_rank, local_size
        self.ranks_per_gpu = -(-local_size // devices) if devices else 0

    def describe(self):
        if not self.devices:
            return "device: host (numpy)"
        shared = f", {self.ranks_per_gpu} ranks per GPU" if self.ranks_per_gpu > 1 else ""
        return f"device: GPU {self.device} of {self.devices} on this node (node-local rank {self.local_rank}{shared})"


def device_for_rank(local_rank, devices):
    """GPU of the node-local rank: round robin, so ranks r and r + devices share one."""
    return local_rank % devices


def device_placement(mpi_comm):
    """This rank's placement, from its rank among the ranks sharing its node's memory."""
    node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    devices = backend.device_count()
    return Placement(device_for_rank(local_rank, devices) if devices else None, devices, local_rank, local_size)


def select_device(mpi_comm=None):
    """Make this rank use its GPU (call before any array is made); returns the Placement.

    ``mpirun -n 8`` on an 8-GPU node gives each rank its own GPU. With more ranks than GPUs
    they share round robin: it works (that is how the tests run on one GPU), but the
    ranks on one GPU divide its memory and take turns at its compute.
    """
    placement = device_placement(MPI.COMM_WORLD if mpi_comm is None else mpi_comm)
    if placement.devices:
        backend.use_device(placement.device)
    return placement


# ---- cuda-aware: device pointers straight to MPI ---------------------------------------

class CudaAwareWire:  # pragma: no cover - needs a GPU and a CUDA-aware MPI
    """mpi4py's own methods on device arrays, after the GPU has finished writing them."""

    def __init__(self, mpi_comm):
        self.mpi = mpi_comm

    def __getattr__(self, name):
        method = getattr(self.mpi, name)

        def call(*args, **kwargs):
            backend.synchronize()  # MPI reads device memory at once; queued kernels must be done
            return method(*args, **kwargs)

        return call
