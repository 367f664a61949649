"""Data parallelism that communicates less: compressed gradients, node-aware sums, local SGD.

Three variations on ``DataParallel`` (parallel/data_parallel.py), each the gradient-sync interface
of parallel/gradient_sync.py, so the Trainer runs them like any other (docs/communication.md):

- ``CompressedDataParallel``: $Δθ ≈ (1/N) Σ_i C(Δθ_i + e_i)$ with $C$ fp16/bf16, top-k or PowerSGD;
- ``DataParallel`` with a ``NodeGroups`` (``--allreduce hierarchical``): the same exact average, routed
  node by node (comm/hierarchical.py);
- ``LocalSGD``: $θ ← (1/N) Σ_i θ_i$ every $H$ steps; no gradient exchange in between.

What each gives up: compression is lossy (error feedback keeps what was not sent and sends it
later); local SGD lets replicas drift apart for $H − 1$ steps. With plain SGD and $H = 1$ local SGD
is data parallelism exactly, because the update is linear: $(1/N) Σ_i (θ − η g_i) = θ − η ḡ$.
"""
from minipar.backend import xp
from minipar.parallel.data_parallel import DataParallel, DataParallelState
from minipar.parallel.gradient_sync import SingleReplica, bytes_held


class CompressedDataParallel(DataParallel):
    """Average the gradients through ``compressor`` (comm/compression.py) instead of a plain allreduce.

    The buckets of ``DataParallel`` still serve the start-up broadcast and the replica checks;
    the gradients themselves go tensor by tensor through the compressor (PowerSGD needs each
    matrix's shape, top-k ranks within a tensor). Blocking: no overlap with backward.
    """

    def __init__(self, parameters, dp_comm, compressor, **options):
        super().__init__(parameters, dp_comm, overlap=False, **options)
        self.compressor = compressor
        self.state = CompressedState(self.parameters, self.buckets, compressor)

    def finish_gradient_sync(self):
        SingleReplica.finish_gradient_sync(self)  # zeros where no micro-batch reached a parameter
        gradients = [p.grad for p in self.parameters]
        self.compressor.average(gradients, self.comm)  # in place: each becomes the (approximate) mean
        self._end_step()


class CompressedState(DataParallelState):
    """``CompressedDataParallel``'s state: the compressor's own arrays travel in this rank's checkpoint."""

    def __init__(self, parameters, buckets, compressor):
        super().__init__(parameters, buckets)
        self.compressor = compressor

    def state_arrays(self, optimizer):
        """The compressor's state (residuals, PowerSGD's Q) for this rank's checkpoint."""
        return self.compressor.state_arrays()

    def load_state_arrays(self, arrays, optimizer):
        self.compressor.load_state_arrays(arrays)

    def memory_report(self, optimizer):
        report = super().memory_report(optimizer)
        report["compression_state"] = bytes_held(self.compressor.state_arrays().values())
        return report


class HierarchicalDataParallel(DataParallel):
    """``DataParallel`` whose bucket sums run node by node (``NodeGroups.allreduce``); exact."""

    def __init__(self, parameters, dp_comm, node_groups, **options):
        super().__init__(parameters, dp_comm, overlap=False, **options)
        self.node_groups = node_groups

    def finish_gradient_sync(self):
        SingleReplica.finish_gradient_sync(self)
        for bucket in self.buckets:
            for slot in bucket.slots:
                self._pack(slot)
            self.node_groups.allreduce(bucket.flat)
        self._unpack_means()
        self._end_step()

    def _unpack_means(self):
        for bucket in self.buckets:
            for slot in bucket.slots:
                summed = bucket.flat[slot.start:slot.stop].reshape(slot.parameter.shape)
                slot.parameter.grad = summed / self.comm.size


class LocalSGD(DataParallel):
    """Each replica steps on its own gradient; every ``period`` steps the parameters are averaged.

    The optimizer state stays local (Lin et al. 2020 keep local momentum buffers). Replicas are
    identical right after each average, and the replica check runs there.
    """

    partitioned_over = ()  # each replica clips by its own gradient's norm

    def __init__(self, parameters, dp_comm, period, **options):
        super().__init__(parameters, dp_comm, overlap=False, **options)
        self.period = period
        self.state = LocalSGDState(self.parameters, self.buckets)

    def finish_gradient_sync(self):
        SingleReplica.finish_gradient_sync(self)  # no communication: that is the point
        self._end_step()

    def after_optimizer_step(self, step):
        if self.is_averaging_step(step):
            self.average_parameters()
            self.check_replicas()

    def is_averaging_step(self, step):
        """Steps are counted from 0; replicas average after steps $H−1$, $2H−1$, …"""
        return (step + 1) % self.period == 0

    def average_parameters(self):
        """$θ ← (1/N) Σ_i θ_i$, one allreduce per bucket (the same bytes as one gradient average)."""
        for bucket in self.buckets:
            for slot in bucket.slots:
                bucket.flat[slot.start:slot.stop] = slot.parameter.data.reshape(-1)
            self.comm.allreduce(bucket.flat, algorithm=self.algorithm)
            for slot in bucket.slots:
                mean = bucket.flat[slot.start:slot.stop].reshape(slot.parameter.shape) / self.comm.size
                slot.parameter.data[...] = mean.astype(slot.parameter.data.dtype, copy=False)


class LocalSGDState(DataParallelState):
    """``LocalSGD``'s state: each replica's own parameters and moments travel in its checkpoint."""

    def state_arrays(self, optimizer):
        """This replica's own parameters and AdamW moments: between averages they differ from dp
        rank 0's, which is all the shared part of a checkpoint holds."""
        arrays = {}
        for i, p in enumerate(self.parameters):
            arrays[f"parameter.{i}"] = p.data
            for slot, moment in optimizer.state.get(id(p), {}).items():
                arrays[f"{slot}.{i}"] = moment
        return arrays

    def load_state_arrays(self, arrays, optimizer):
        for name, array in arrays.items():
            kind, index = name.rsplit(".", 1)
            p = self.parameters[int(index)]
            if kind == "parameter":
                p.data[...] = array
            else:
                optimizer.state.setdefault(id(p), {})[kind] = xp.asarray(array, dtype=p.dtype).copy()
