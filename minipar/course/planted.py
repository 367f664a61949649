"""Realistic wrong solutions, as text patches on the reference, that every check must catch.

Each ``Planted`` replaces ``old`` (which must occur exactly once in ``path``) by ``new`` in a
copy of the reference tree; ``tests/test_course.py`` grades the copy and asserts that some
check fails and that the failure message contains ``expect``, the words that point at the
mistake. Teacher-only: left out of the student version.
"""
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Planted:
    exercise: str
    name: str          # the mistake, as a student would make it
    path: str
    old: str
    new: str
    expect: str        # a fragment of the failure message that points at the mistake
    limit: float = 60  # a planted deadlock only needs a short limit to be caught


def apply(planted, root):
    """Patch the tree at ``root`` in place."""
    path = Path(root) / planted.path
    text = path.read_text()
    if text.count(planted.old) != 1:
        raise ValueError(f"planted {planted.name!r}: the text to replace occurs {text.count(planted.old)} times "
                         f"in {planted.path}, not once; update minipar/course/planted.py")
    path.write_text(text.replace(planted.old, planted.new))


FUSED, COLLECTIVES, TOPOLOGY = "minipar/ops/fused.py", "minipar/comm/collectives.py", "minipar/parallel/topology.py"
TP_COMM, TP_LAYERS = "minipar/parallel/tensor_parallel_comm.py", "minipar/parallel/tensor_parallel.py"
SCHEDULES = "minipar/parallel/pipeline/schedules.py"
DATA_PARALLEL, ZERO = "minipar/parallel/data_parallel.py", "minipar/parallel/zero.py"
EXECUTOR = "minipar/parallel/pipeline/executor.py"

PLANTED = (
    Planted("layer_norm_backward", "g_hat without the weight", FUSED,
            "g_hat = grad * weight", "g_hat = grad", "dL/dx"),
    Planted("layer_norm_backward", "grad_weight summed without x_hat", FUSED,
            "grad_weight = (rows * x_hat.reshape(rows.shape)).sum(axis=0)", "grad_weight = rows.sum(axis=0)",
            "dL/dweight"),
    Planted("layer_norm_backward", "the mean(g_hat) term dropped", FUSED,
            "(g_hat - g_hat.mean(axis=-1, keepdims=True)\n", "(g_hat\n", "dL/dx"),

    Planted("ring_allreduce", "ring neighbours swapped in the reduce-scatter", COLLECTIVES,
            "right, left = (rank + 1) % size, (rank - 1) % size\n    incoming_space",
            "right, left = (rank - 1) % size, (rank + 1) % size\n    incoming_space",
            "to r + 1 = 1 and receives from r - 1"),
    Planted("ring_allreduce", "reduce-scatter block index off by one", COLLECTIVES,
            "send_start, send_stop = bounds[(rank - step - 1) % size]\n"
            "        receive_start, receive_stop = bounds[(rank - step - 2) % size]",
            "send_start, send_stop = bounds[(rank - step) % size]\n"
            "        receive_start, receive_stop = bounds[(rank - step - 1) % size]", "after ring_reduce_scatter"),
    Planted("ring_allreduce", "received block overwrites instead of adding", COLLECTIVES,
            "reduce_into(flat[receive_start:receive_stop], incoming)",
            "flat[receive_start:receive_stop] = incoming", "contributions missing"),
    Planted("ring_allreduce", "all-gather forwards a block it has not received yet", COLLECTIVES,
            "send_start, send_stop = bounds[(rank - step) % size]",
            "send_start, send_stop = bounds[(rank - step + 1) % size]", "at step s the ring sends block (r - s) mod N"),

    Planted("recursive_doubling", "partner = rank XOR distance, ignoring the folded ranks", COLLECTIVES,
            "partner = 2 * partner_position + 1 if partner_position < extra else partner_position + extra",
            "partner = rank ^ distance", "Invalid rank has value 3", limit=15),
    Planted("recursive_doubling", "folded ranks never get the result back", COLLECTIVES,
            "    if rank < 2 * extra:\n        mpi_comm.Send(flat, rank - 1, tag)\n"
            "        traffic += Traffic(flat.nbytes, 0)\n",
            "", "did not finish", limit=15),
    Planted("recursive_doubling", "distance grows by one instead of doubling", COLLECTIVES,
            "        distance *= 2\n\n    if rank < 2 * extra:", "        distance += 1\n\n    if rank < 2 * extra:",
            "counted more than once"),

    Planted("process_grid", "data-parallel rank varies fastest", TOPOLOGY,
            "tp_rank = rank % self.tp\n        dp_rank = rank // self.tp % self.dp",
            "dp_rank = rank % self.dp\n        tp_rank = rank // self.dp % self.tp", "coordinates"),
    Planted("process_grid", "tensor- and data-parallel colours swapped", TOPOLOGY,
            "self.tp = world.split(color=self.dp_rank + layout.dp * self.pp_rank, key=self.tp_rank)",
            "self.tp = world.split(color=self.tp_rank + layout.tp * self.pp_rank, key=self.tp_rank)",
            "grid.tp holds world ranks"),
    Planted("process_grid", "pipeline groups ignore the replica", TOPOLOGY,
            "self.pp = world.split(color=self.tp_rank + layout.tp * self.dp_rank, key=self.pp_rank)",
            "self.pp = world.split(color=self.tp_rank, key=self.pp_rank)", "grid.pp holds world ranks"),

    Planted("megatron_f_g", "f's backward is the identity (f and g mixed up)", TP_COMM,
            "        return allreduce_sum(grad, ctx.communicator)\n", "        return grad\n",
            "f's backward sums dL/dy over the tensor-parallel ranks"),
    Planted("megatron_f_g", "the row-parallel bias added on every rank before g", TP_LAYERS,
            "out = self.region.leave(ops.linear(x, self.weight))\n"
            "        return out + self.bias if self.bias is not None else out",
            "return self.region.leave(ops.linear(x, self.weight, self.bias))", "the bias added once after the sum"),
    Planted("megatron_f_g", "the column-parallel layer without f", TP_LAYERS,
            "        x = self.region.enter(x)\n", "",
            "dL/dx through both layers"),

    Planted("vocab_parallel_loss", "each rank shifts by its own row max", TP_COMM,
            '        communicator.allreduce(row_max, op="max")\n', "", "each rank's own row max"),
    Planted("vocab_parallel_loss", "the sum of exponentials not summed over ranks", TP_COMM,
            "        communicator.allreduce(sum_exps)\n", "", "only this rank's Σ exp"),
    Planted("vocab_parallel_loss", "the target's shard misses its first entry", TP_COMM,
            "mine = (flat_targets >= vocab_start) & (flat_targets < vocab_start + local_vocab)",
            "mine = (flat_targets > vocab_start) & (flat_targets < vocab_start + local_vocab)",
            "targets on a shard's first entry found on no rank"),

    Planted("one_f_one_b", "one warm-up forward too many", SCHEDULES,
            "    warmup = min(num_stages - stage - 1, num_microbatches)\n",
            "    warmup = min(num_stages - stage, num_microbatches)\n", "1F1B allows min(p − s, m)"),
    Planted("one_f_one_b", "the stash popped in the wrong order (drain backwards last-in first-out)", SCHEDULES,
            "    for microbatch in range(num_microbatches - warmup, num_microbatches):\n        actions += backward",
            "    for microbatch in reversed(range(num_microbatches - warmup, num_microbatches)):\n"
            "        actions += backward", "a backward waits longer than it must"),
    Planted("one_f_one_b", "steady state runs the newest micro-batch's backward", SCHEDULES,
            "        actions += backward_actions(step, stage, num_stages)\n",
            "        actions += backward_actions(warmup + step, stage, num_stages)\n", "expected each of 0",
            limit=15),

    Planted("data_parallel", "averaging by N − 1", DATA_PARALLEL,
            "slot.parameter.grad = summed / self.comm.size", "slot.parameter.grad = summed / (self.comm.size - 1)",
            "divided by N − 1 instead of N"),
    Planted("data_parallel", "a bucket sent on every micro-batch (at the first grad-ready hook)", DATA_PARALLEL,
            "        if slot.firings == slot.expected:\n            self._pack(slot)",
            "        if slot.firings == 1:\n            self._pack(slot)", "communicate on the last micro-batch only"),
    Planted("data_parallel", "a gradient unpacked one element off its bucket slot", DATA_PARALLEL,
            "summed = bucket.flat[slot.start:slot.stop].reshape(slot.parameter.shape)",
            "summed = xp.roll(bucket.flat, 1)[slot.start:slot.stop].reshape(slot.parameter.shape)",
            ".grad after finish_gradient_sync, element"),

    Planted("pipeline_messages", "one send buffer reused while its Isend is in flight", EXECUTOR,
            "        buffer = self._free_send_buffer(action)\n",
            "        if getattr(self, '_the_buffer', None) is None:\n            self._the_buffer = "
            "self._new_buffer(action)\n        buffer = self._the_buffer\n", "while its Isend was still in flight"),
    Planted("pipeline_messages", "every message sent to the next stage, gradients too", EXECUTOR,
            "request = self.comm.isend(buffer, peer_rank(action, self.num_stages), "
            "message_tag(action, self.total_chunks))",
            "request = self.comm.isend(buffer, (self.stage + 1) % self.num_stages, "
            "message_tag(action, self.total_chunks))", "did not finish", limit=15),
    Planted("pipeline_messages", "the received activation is not a leaf that requires a gradient", EXECUTOR,
            'self._received[("activation", *key)] = Tensor(fresh, requires_grad=True)',
            'self._received[("activation", *key)] = Tensor(fresh)', "no gradient reached this stage"),

    Planted("zero_1", "gradient parts averaged by N − 1", ZERO,
            "        gradient /= self.count\n", "        gradient /= self.count - 1\n",
            "divided by N − 1 instead of N"),
    Planted("zero_1", "the updated parts never all-gathered", ZERO,
            "        if self.stage < 3:\n            for unit in self.units:\n                rows = self._all_gather",
            "        if self.stage < 0:\n            for unit in self.units:\n                rows = self._all_gather",
            "all-gather the updated parts"),
    Planted("zero_1", "part boundaries off by one (padding in front)", ZERO,
            "        rows.reshape(-1)[:array.size] = array.reshape(-1)\n",
            "        rows.reshape(-1)[rows.size - array.size:] = array.reshape(-1)\n", "its part of dL/d"),
)
