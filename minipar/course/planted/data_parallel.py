"""The corpus of exercise data_parallel (Data-parallel gradient averaging over buckets, on the last micro-batch
only): wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives they
must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import DATA_PARALLEL, Planted, region

_OWN_HOOK_COUNT = """
if not hasattr(self, "hook_counts"):   # my own count of each parameter's grad-ready hooks
    self.hook_counts = {}
self.hook_counts[slot.name] = self.hook_counts.get(slot.name, 0) + 1
if self.hook_counts[slot.name] >= slot.expected:
    self._pack(slot)
    self._launch_full_buckets()
for bucket in self.buckets[:self._next_launch]:
    bucket.request.test()
"""
_SENT_SET_READY = """
if slot.firings == slot.expected:
    self._pack(slot)
    if not hasattr(self, "sent"):
        self.sent = set()
    for index, bucket in enumerate(self.buckets):   # launch full buckets in order, each once
        if index in self.sent:
            continue
        if bucket.slots_packed < len(bucket.slots):
            break
        bucket.request = self.comm.iallreduce(bucket.flat)
        self.sent.add(index)
"""
_SENT_SET_FINISH = """
if not hasattr(self, "sent"):
    self.sent = set()
for index, bucket in enumerate(self.buckets):
    if index not in self.sent:
        for slot in bucket.slots:
            if slot.firings < slot.expected:
                self._pack(slot)
        bucket.request = self.comm.iallreduce(bucket.flat)
        self.sent.add(index)
for bucket in self.buckets:
    bucket.request.wait()
    bucket.flat /= self.comm.size
    for slot in bucket.slots:
        slot.parameter.grad = slot.view
"""
_SCRATCH_MADE_ONCE = """
if self.overlap:
    for bucket in self.buckets[self._next_launch:]:
        for slot in bucket.slots:
            if slot.firings < slot.expected:
                self._pack(slot)
    self._launch_full_buckets()
    for bucket in self.buckets:
        bucket.request.wait()
        bucket.flat /= self.comm.size
        for slot in bucket.slots:
            slot.parameter.grad = slot.view
    self._end_step()
    return
if not hasattr(self, "totals"):   # one scratch buffer per bucket, made once
    self.totals = [xp.zeros_like(bucket.flat) for bucket in self.buckets]
for bucket, total in zip(self.buckets, self.totals, strict=True):
    for slot in bucket.slots:
        self._pack(slot)
    total += bucket.flat
    self.comm.allreduce(total, algorithm=self.algorithm)
    total /= self.comm.size
    for slot in bucket.slots:
        slot.parameter.grad = total[slot.start:slot.stop].reshape(slot.parameter.shape)
"""
_PER_PARAMETER = """
if self.overlap:
    for bucket in self.buckets[self._next_launch:]:
        for slot in bucket.slots:
            if slot.firings < slot.expected:
                self._pack(slot)
    self._launch_full_buckets()
    for bucket in self.buckets:
        bucket.request.wait()
        bucket.flat /= self.comm.size
else:
    for p in self.parameters:   # one allreduce per gradient: no need for buckets
        if p.grad is None:
            p.grad = xp.zeros_like(p.data)
        self.comm.allreduce(p.grad)
        p.grad /= self.comm.size
for bucket in self.buckets:
    for slot in bucket.slots:
        slot.parameter.grad = slot.view
self._end_step()
"""
_BLOCKING_IN_THE_HOOK = """
if slot.firings == slot.expected:
    self._pack(slot)
    while self._next_launch < len(self.buckets):   # full buckets, in order, allreduced at once
        bucket = self.buckets[self._next_launch]
        if bucket.slots_packed < len(bucket.slots):
            break
        self.comm.allreduce(bucket.flat)
        bucket.request = self.comm.iallreduce(bucket.flat[:0])   # something for finish to wait on
        self._next_launch += 1
"""

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
    region("data_parallel", "my own count of grad-ready hooks, never reset (step 2 sends at the first micro-batch)",
           DATA_PARALLEL, {"DataParallel.gradient_ready": _OWN_HOOK_COUNT}, "not reset"),
    region("data_parallel", "a set of buckets already sent, never cleared (step 2 waits for a bucket never sent)",
           DATA_PARALLEL, {"DataParallel.gradient_ready": _SENT_SET_READY,
                           "DataParallel.finish_gradient_sync": _SENT_SET_FINISH}, "not reset"),
    region("data_parallel", "a scratch sum made once and added into (step 2 holds step 1's gradient too)",
           DATA_PARALLEL, {"DataParallel.finish_gradient_sync": _SCRATCH_MADE_ONCE}, "previous step's gradient"),
    Planted("data_parallel", "only dp rank 0 divides by N (the others keep the sum)", DATA_PARALLEL,
            "            bucket.flat /= self.comm.size  # Σ_i Δθ_i -> the average, in place, one pass\n",
            "            if self.comm.rank == 0:\n                bucket.flat /= self.comm.size\n",
            "rank 1, step 1"),
    Planted("data_parallel", "near miss: the average off by 1e-9 relative", DATA_PARALLEL,
            "            bucket.flat /= self.comm.size  # Σ_i Δθ_i -> the average, in place, one pass\n",
            "            bucket.flat /= self.comm.size * (1 + 1e-9)\n", ".grad after finish_gradient_sync, element"),
    region("data_parallel", "one allreduce per parameter, no buckets", DATA_PARALLEL,
           {"DataParallel.finish_gradient_sync": _PER_PARAMETER}, "one allreduce per bucket"),
    region("data_parallel", "a blocking allreduce in the grad-ready hook (no overlap, though during backward)",
           DATA_PARALLEL, {"DataParallel.gradient_ready": _BLOCKING_IN_THE_HOOK}, "(blocking) from the grad-ready hook"),
)

ALTERNATIVES = (
    Planted("data_parallel", "the average as a product with 1/N", DATA_PARALLEL,
            ("slot.parameter.grad = summed / self.comm.size", "bucket.flat /= self.comm.size  # Σ_i"),
            ("slot.parameter.grad = summed * (1.0 / self.comm.size)", "bucket.flat *= 1.0 / self.comm.size  # Σ_i"),
            ""),
    Planted("data_parallel", "no progress tests in the hook (MPI progresses at the waits)", DATA_PARALLEL,
            "        for bucket in self.buckets[:self._next_launch]:\n            bucket.request.test()\n", "", ""),
)
