"""The corpus of exercise data_parallel (Data-parallel gradient averaging over buckets, on the last micro-batch
only): wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives they
must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import DATA_PARALLEL, Planted

WRONG = (
    Planted("data_parallel", "averaging by N − 1", DATA_PARALLEL,
            "bucket.flat /= self.comm.size", "bucket.flat /= self.comm.size - 1",
            "divided by N − 1 instead of N"),
    Planted("data_parallel", "a bucket sent on every micro-batch (at the first grad-ready hook)", DATA_PARALLEL,
            "        if slot.firings == slot.expected:\n            self._pack(slot)",
            "        if slot.firings == 1:\n            self._pack(slot)", "communicate on the last micro-batch only"),
    Planted("data_parallel", "a gradient unpacked one element off its bucket slot", DATA_PARALLEL,
            "slot.parameter.grad = slot.view  # the average, where backward left it",
            "slot.parameter.grad = xp.roll(bucket.flat, 1)[slot.start:slot.stop].reshape(slot.parameter.shape)",
            ".grad after finish_gradient_sync, element"),
    Planted("data_parallel", "no overlap: every bucket sent in finish_gradient_sync", DATA_PARALLEL,
            "        if slot.firings == slot.expected:\n            self._pack(slot)\n            self._launch_full_buckets()\n",
            "", "no allreduce started before the last backward ended",
            more=(("        if self.overlap:\n            for bucket in self.buckets[self._next_launch:]:",
                   "        if False:\n            for bucket in self.buckets[self._next_launch:]:"),)),
    Planted("data_parallel", "float32 gradients averaged into float64", DATA_PARALLEL,
            ("slot.parameter.grad = summed / self.comm.size",
             "slot.parameter.grad = slot.view  # the average, where backward left it"),
            ("slot.parameter.grad = summed.astype('float64') / self.comm.size",
             "slot.parameter.grad = slot.view.astype('float64')"), "keep the dtype"),
)

ALTERNATIVES = (
    Planted("data_parallel", "the average as a product with 1/N", DATA_PARALLEL,
            ("slot.parameter.grad = summed / self.comm.size", "bucket.flat /= self.comm.size  # Σ_i"),
            ("slot.parameter.grad = summed * (1.0 / self.comm.size)", "bucket.flat *= 1.0 / self.comm.size  # Σ_i"),
            ""),
    Planted("data_parallel", "no progress tests in the hook (MPI progresses at the waits)", DATA_PARALLEL,
            "        for bucket in self.buckets[:self._next_launch]:\n            bucket.request.test()\n", "", ""),
)
