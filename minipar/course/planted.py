"""The corpus: realistic wrong solutions that every check must catch, and correct variants it must pass.

Each ``Planted`` patches a copy of the reference tree: ``old`` (which must occur exactly once
in ``path``) becomes ``new``, the pairs in ``more`` likewise, and each (function, body) of
``regions`` replaces that function's whole solution region. ``tests/test_course.py`` grades
the copy: a wrong solution (``PLANTED``) must fail some check with ``expect`` in the report,
the words that point at the mistake; an alternative (``ALTERNATIVES``, ``expect`` empty) must
pass every check. Teacher-only: left out of the student version.

The kinds of mistake, as the course's students make them: an ordering that can deadlock, a
built-in in place of the algorithm, state not reset across steps, a changed dtype, sizes not
divisible by N, other ranks' gradients wrong, buffer aliasing, no overlap, and a near miss (a
result off by about 1e-9 relative, which a tolerance 1,000 times looser than the grader's
would pass).
"""
import textwrap
from dataclasses import dataclass
from pathlib import Path

from minipar.course.markers import replace_regions


@dataclass(frozen=True)
class Planted:
    exercise: str
    name: str          # the mistake, as a student would make it
    path: str
    old: object        # the text to replace, or a tuple of versions of it (the first found once is used)
    new: object        # its replacement, or a tuple matching ``old``
    expect: str        # a fragment of the failure message that points at the mistake ("" for an alternative)
    limit: float = 60  # a planted deadlock only needs a short limit to be caught
    more: tuple = ()     # further (old, new) replacements in the same file
    regions: tuple = ()  # (qualified function name, new body of its solution region)


def apply(planted, root):
    """Patch the tree at ``root`` in place."""
    path = Path(root) / planted.path
    text = path.read_text()
    for old, new in ((planted.old, planted.new), *planted.more):
        if not old:
            continue
        if isinstance(old, tuple):   # versions of the reference: the first that occurs once, and its new text
            old, new = next(((o, n) for o, n in zip(old, new, strict=True) if text.count(o) == 1), (old[0], new[0]))
        if text.count(old) != 1:
            raise ValueError(f"planted {planted.name!r}: the text to replace occurs {text.count(old)} times "
                             f"in {planted.path}, not once; update minipar/course/planted.py")
        text = text.replace(old, new)
    bodies = dict(planted.regions)
    if bodies:
        def body_for(region):
            if region.function not in bodies:
                return None
            return [region.indent + line if line else "" for line in textwrap.dedent(bodies[region.function])
                    .strip("\n").splitlines()]

        text, regions = replace_regions(text, planted.path, body_for)
        missing = set(bodies) - {region.function for region in regions}
        if missing:
            raise ValueError(f"planted {planted.name!r}: no solution region in {sorted(missing)} of {planted.path}")
    path.write_text(text)


def region(exercise, name, path, bodies, expect, limit=60):
    """A wrong solution or an alternative that rewrites whole solution regions: ``bodies`` {function: code}."""
    return Planted(exercise, name, path, "", "", expect, limit, regions=tuple(bodies.items()))


FUSED, COLLECTIVES, TOPOLOGY = "minipar/ops/fused.py", "minipar/comm/collectives.py", "minipar/parallel/topology.py"
TP_COMM, TP_LAYERS = "minipar/parallel/tensor_parallel_comm.py", "minipar/parallel/tensor_parallel.py"
SCHEDULES = "minipar/parallel/pipeline/schedules.py"
DATA_PARALLEL, ZERO = "minipar/parallel/data_parallel.py", "minipar/parallel/zero.py"
EXECUTOR = "minipar/parallel/pipeline/executor.py"
ZERO_BUBBLE = "minipar/parallel/pipeline/zero_bubble.py"
CONTEXT = "minipar/parallel/context_parallel.py"

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
            "every step must turn the same way"),
    Planted("ring_allreduce", "reduce-scatter block index off by one", COLLECTIVES,
            "send_start, send_stop = bounds[(rank - step - 1) % size]\n"
            "        receive_start, receive_stop = bounds[(rank - step - 2) % size]",
            "send_start, send_stop = bounds[(rank - step) % size]\n"
            "        receive_start, receive_stop = bounds[(rank - step - 1) % size]", "at step 0 rank 0 sent block 0"),
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
            "bucket.flat /= self.comm.size", "bucket.flat /= self.comm.size - 1",
            "divided by N − 1 instead of N"),
    Planted("data_parallel", "a bucket sent on every micro-batch (at the first grad-ready hook)", DATA_PARALLEL,
            "        if slot.firings == slot.expected:\n            self._pack(slot)",
            "        if slot.firings == 1:\n            self._pack(slot)", "communicate on the last micro-batch only"),
    Planted("data_parallel", "a gradient unpacked one element off its bucket slot", DATA_PARALLEL,
            "slot.parameter.grad = slot.view  # the average, where backward left it",
            "slot.parameter.grad = xp.roll(bucket.flat, 1)[slot.start:slot.stop].reshape(slot.parameter.shape)",
            ".grad after finish_gradient_sync, element"),

    Planted("pipeline_messages", "one send buffer reused while its Isend is in flight", EXECUTOR,
            "        buffer = self._free_send_buffer(action)\n",
            "        if getattr(self, '_the_buffer', None) is None:\n            self._the_buffer = "
            "self._new_buffer(action)\n        buffer = self._the_buffer\n", "while its Isend was still in flight"),
    Planted("pipeline_messages", "every message sent to the next stage, gradients too", EXECUTOR,
            "request = self.comm.isend(buffer, peer_rank(action, self.num_stages, self.placement),",
            "request = self.comm.isend(buffer, (self.stage + 1) % self.num_stages,", "did not finish", limit=15),
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

# ---- ring pieces the corpus reuses --------------------------------------------------------------
_SEND_FIRST_RING = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
if size == 1:
    return traffic
bounds = block_bounds(flat.size, size)
incoming = flat[:bounds[0][1]].copy()
for step in range(size - 1):
    s0, s1 = bounds[(rank - step - 1) % size]
    r0, r1 = bounds[(rank - step - 2) % size]
    mpi_comm.Send(flat[s0:s1], (rank + 1) % size, 11)
    mpi_comm.Recv(incoming[:r1 - r0], (rank - 1) % size, 11)
    REDUCE_INTO[op](flat[r0:r1], incoming[:r1 - r0])
    traffic += Traffic((s1 - s0) * flat.itemsize, (r1 - r0) * flat.itemsize)
return traffic
"""
_BUILT_IN_RING = """
from mpi4py import MPI
flat = _flat(buffer)
mpi_comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM if op == "sum" else MPI.MAX)
return modelled_traffic("reduce_scatter", mpi_comm.Get_rank(), mpi_comm.Get_size(), flat.size, flat.itemsize)
"""
_MIRRORED_REDUCE_SCATTER = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
if size == 1:
    return traffic
bounds = block_bounds(flat.size, size)
spare = flat[:bounds[0][1]].copy()
for step in range(size - 1):
    out_start, out_stop = bounds[(rank + step + 1) % size]    # to the left, r - 1
    in_start, in_stop = bounds[(rank + step + 2) % size]      # from the right, r + 1
    arrived = spare[:in_stop - in_start]
    mpi_comm.Sendrecv(flat[out_start:out_stop], (rank - 1) % size, 3, arrived, (rank + 1) % size, 3)
    REDUCE_INTO[op](flat[in_start:in_stop], arrived)
    traffic += Traffic((out_stop - out_start) * flat.itemsize, arrived.nbytes)
return traffic
"""
_MIRRORED_ALL_GATHER = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
for step in range(size - 1):
    out_start, out_stop = block_bounds(flat.size, size)[(rank + step) % size]
    in_start, in_stop = block_bounds(flat.size, size)[(rank + step + 1) % size]
    mpi_comm.Sendrecv(flat[out_start:out_stop], (rank - 1) % size, 4, flat[in_start:in_stop], (rank + 1) % size, 4)
    traffic += Traffic((out_stop - out_start) * flat.itemsize, (in_stop - in_start) * flat.itemsize)
return traffic
"""
_NONBLOCKING_REDUCE_SCATTER = """
from mpi4py import MPI
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
if size == 1:
    return traffic
bounds = block_bounds(flat.size, size)
incoming = flat[:bounds[0][1]].copy()
for step in range(size - 1):
    s0, s1 = bounds[(rank - step - 1) % size]
    r0, r1 = bounds[(rank - step - 2) % size]
    requests = [mpi_comm.Irecv(incoming[:r1 - r0], (rank - 1) % size, 5),
                mpi_comm.Isend(flat[s0:s1], (rank + 1) % size, 5)]
    MPI.Request.Waitall(requests)
    REDUCE_INTO[op](flat[r0:r1], incoming[:r1 - r0])
    traffic += Traffic((s1 - s0) * flat.itemsize, (r1 - r0) * flat.itemsize)
return traffic
"""
_NONBLOCKING_ALL_GATHER = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
bounds = block_bounds(flat.size, size)
for step in range(size - 1):
    s0, s1 = bounds[(rank - step) % size]
    r0, r1 = bounds[(rank - step - 1) % size]
    receiving = mpi_comm.Irecv(flat[r0:r1], (rank - 1) % size, 6)
    sending = mpi_comm.Isend(flat[s0:s1], (rank + 1) % size, 6)
    receiving.Wait()
    sending.Wait()
    traffic += Traffic((s1 - s0) * flat.itemsize, (r1 - r0) * flat.itemsize)
return traffic
"""
_EVEN_ODD_REDUCE_SCATTER = """
flat = _flat(buffer)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
traffic = Traffic()
if size == 1:
    return traffic
bounds = block_bounds(flat.size, size)
incoming = flat[:bounds[0][1]].copy()
for step in range(size - 1):
    s0, s1 = bounds[(rank - step - 1) % size]
    r0, r1 = bounds[(rank - step - 2) % size]
    if rank % 2 == 0:     # even ranks send first, odd ranks receive first: no cycle of waiting sends
        mpi_comm.Send(flat[s0:s1], (rank + 1) % size, 8)
        mpi_comm.Recv(incoming[:r1 - r0], (rank - 1) % size, 8)
    else:
        mpi_comm.Recv(incoming[:r1 - r0], (rank - 1) % size, 8)
        mpi_comm.Send(flat[s0:s1], (rank + 1) % size, 8)
    REDUCE_INTO[op](flat[r0:r1], incoming[:r1 - r0])
    traffic += Traffic((s1 - s0) * flat.itemsize, (r1 - r0) * flat.itemsize)
return traffic
"""
_ZERO_BY_ALLREDUCE = """
rows = xp.zeros((self.count, unit.length), dtype=unit.parameters[0].dtype)
for p, place in unit.slots():
    if p.grad is not None:
        rows[:, place] = self._rows(p, p.grad)
    p.grad = None
self.comm.allreduce(rows)
gradient = rows[self.rank] / self.count
for p, place in unit.slots():
    self.parts[id(p)].grad = gradient[place]
unit.sent = True
"""
_VOCAB_ONE_ALLREDUCE_FOR_TWO = """
rows = logits.reshape(-1, local_vocab)
row_max = rows.max(axis=1)
communicator.allreduce(row_max, op="max")
shifted = rows - row_max[:, None]
exps = xp.exp(shifted)
local = flat_targets - vocab_start
mine = (local >= 0) & (local < local_vocab)
local_targets = xp.where(mine, local, 0)
both = xp.stack([exps.sum(axis=1), shifted[xp.arange(rows.shape[0]), local_targets] * mine])
communicator.allreduce(both)          # Σ exp and the target's logit in one message
sum_exps, target_logits = both[0], both[1]
exps /= sum_exps[:, None]
row_losses = xp.log(sum_exps) - target_logits
"""
_ONE_F_ONE_B_COUNTERS = """
warmup = min(num_stages - stage - 1, num_microbatches)
actions, forwards, backwards = [], 0, 0
while backwards < num_microbatches:
    if forwards < num_microbatches and forwards - backwards <= warmup:
        actions += forward_actions(forwards, stage, num_stages)
        forwards += 1
    else:
        actions += backward_actions(backwards, stage, num_stages)
        backwards += 1
return actions
"""
_ONE_F_ONE_B_ORDER = """
warmup = min(num_stages - stage - 1, num_microbatches)
order = [("F", i) for i in range(warmup)]
for i in range(num_microbatches - warmup):
    order += [("F", warmup + i), ("B", i)]
order += [("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
actions = []
for kind, microbatch in order:
    actions += (forward_actions if kind == "F" else backward_actions)(microbatch, stage, num_stages)
return actions
"""
_GPIPE_ORDER = """
actions = []
for microbatch in range(num_microbatches):
    actions += forward_actions(microbatch, stage, num_stages)
for microbatch in range(num_microbatches):
    actions += backward_actions(microbatch, stage, num_stages)
return actions
"""

MORE_PLANTED = (
    Planted("layer_norm_backward", "near miss: dL/dx off by 1e-9 relative", FUSED,
            "        return grad_x, grad_weight, grad_bias\n",
            "        return grad_x * (1 + 1e-9), grad_weight, grad_bias\n", "autograd through the layer norm"),
    Planted("layer_norm_backward", "the x_hat term averaged over the whole batch, not per row", FUSED,
            "- x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True))", "- x_hat * (g_hat * x_hat).mean())",
            "dL/dx for x of shape"),

    region("ring_allreduce", "ring of blocking sends: every rank sends first (deadlocks past the eager limit)",
           COLLECTIVES, {"ring_reduce_scatter": _SEND_FIRST_RING}, "deadlock: ranks"),
    region("ring_allreduce", "MPI's built-in with made-up traffic", COLLECTIVES,
           {"ring_reduce_scatter": _BUILT_IN_RING}, "called MPI's Allreduce"),
    Planted("ring_allreduce", "near miss: each hop adds 1e-9 relative", COLLECTIVES,
            "reduce_into(flat[receive_start:receive_stop], incoming)",
            "reduce_into(flat[receive_start:receive_stop], incoming * (1 + 1e-9))", "expected"),
    Planted("ring_allreduce", "a float64 scratch buffer in a float32 ring", COLLECTIVES,
            "incoming_space = _scratch(flat, bounds[0][1] - bounds[0][0])",
            "incoming_space = _scratch(flat.astype('float64'), bounds[0][1] - bounds[0][0])", "buffer of its own dtype"),

    region("recursive_doubling", "MPI's built-in Allreduce", COLLECTIVES,
           {"recursive_doubling_allreduce": _BUILT_IN_RING.replace("modelled_traffic(\"reduce_scatter\"",
                                                                   "modelled_traffic(\"allreduce\"")},
           "called MPI's Allreduce"),
    Planted("recursive_doubling", "partners both send first (deadlocks past the eager limit)", COLLECTIVES,
            "        mpi_comm.Sendrecv(flat, partner, tag, incoming, partner, tag)\n",
            "        mpi_comm.Send(flat, partner, tag)\n        mpi_comm.Recv(incoming, partner, tag)\n",
            "deadlock: ranks"),
    Planted("recursive_doubling", "near miss: the result off by 1e-9 relative", COLLECTIVES,
            "        distance *= 2\n\n    if rank < 2 * extra:",
            "        distance *= 2\n    if op == 'sum':\n        flat *= 1 + 1e-9\n\n    if rank < 2 * extra:",
            "expected"),

    Planted("process_grid", "data-parallel groups ignore the stage", TOPOLOGY,
            "self.dp = world.split(color=self.tp_rank + layout.tp * self.pp_rank, key=self.dp_rank)",
            "self.dp = world.split(color=self.tp_rank, key=self.dp_rank)", "grid.dp holds world ranks"),

    region("megatron_f_g", "the row-parallel bias on rank 0 only (other ranks' bias gradients lost)", TP_LAYERS,
           {"RowParallelLinear.forward": """
partial = ops.linear(x, self.weight, self.bias if self.region.communicator.rank == 0 else None)
return self.region.leave(partial)
"""}, "the row-parallel bias"),
    Planted("megatron_f_g", "g's backward sums too (an allreduce both ways)", TP_COMM,
            "    def backward(ctx, grad):\n        ### BEGIN SOLUTION\n        return grad\n",
            "    def backward(ctx, grad):\n        ### BEGIN SOLUTION\n        return allreduce_sum(grad, ctx.communicator)\n",
            "g's backward is the identity",
            more=(("        return allreduce_sum(partial, communicator)\n",
                   "        ctx.communicator = communicator\n        return allreduce_sum(partial, communicator)\n"),)),

    Planted("vocab_parallel_loss", "near miss: the loss off by 1e-9 relative", TP_COMM,
            "        row_losses = xp.log(sum_exps) - target_logits  # (B T,) log S_i - zt_i\n",
            "        row_losses = (xp.log(sum_exps) - target_logits) * (1 + 1e-9)\n", "the loss"),
    Planted("vocab_parallel_loss", "no max shift (exp overflows for large logits)", TP_COMM,
            "        shifted = rows - row_max[:, None]\n", "        shifted = rows + 0.0\n", "logits + 1000"),

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

    region("one_f_one_b", "all forwards, then all backwards (GPipe, not 1F1B)", SCHEDULES,
           {"one_f_one_b": _GPIPE_ORDER}, "1F1B allows min(p − s, m)"),

    Planted("pipeline_messages", "the receive buffer kept in the graph while MPI reuses it", EXECUTOR,
            "        fresh = buffer.copy()  # owned by the graph; the buffer goes straight back to MPI\n",
            "        fresh = buffer\n", "dL/d"),

    region("zero_1", "ZeRO-1 as an allreduce, each rank keeping its own row", ZERO,
           {"Zero._reduce_scatter": _ZERO_BY_ALLREDUCE}, "never an allreduce"),
    Planted("zero_1", "padding that turns float32 into float64", ZERO,
            "rows = xp.zeros((self.count, part_length(p.size, self.count)), dtype=array.dtype)",
            "rows = xp.zeros((self.count, part_length(p.size, self.count)), dtype=xp.float64)", "float32 run"),
)

# ---- ZB-H1 as data ------------------------------------------------------------------------------
_ZB_H1_B_BEFORE_F = """
warmup = min(num_stages - stage - 1, num_microbatches)
actions, weights_owed = [], list(range(num_microbatches))
for microbatch in range(warmup):
    actions += forward_actions(microbatch, stage, num_stages)
for step in range(num_microbatches - warmup):
    actions += split_backward_actions(step, stage, num_stages)
    if step >= stage:
        actions.append(Action(BACKWARD_WEIGHT, weights_owed.pop(0), stage))
    actions += forward_actions(warmup + step, stage, num_stages)
for microbatch in range(num_microbatches - warmup, num_microbatches):
    actions += split_backward_actions(microbatch, stage, num_stages)
    actions.append(Action(BACKWARD_WEIGHT, weights_owed.pop(0), stage))
actions += [Action(BACKWARD_WEIGHT, microbatch, stage) for microbatch in weights_owed]
return actions
"""
_ZB_H1_COUNTERS = """
warmup = min(num_stages - stage - 1, num_microbatches)
actions, forwards, backwards, weights = [], 0, 0, 0
while weights < num_microbatches:
    if forwards < num_microbatches and forwards - backwards <= warmup:
        actions += forward_actions(forwards, stage, num_stages)
        forwards += 1
    elif backwards < num_microbatches:
        actions += split_backward_actions(backwards, stage, num_stages)
        backwards += 1
        if backwards > stage or backwards > num_microbatches - warmup:
            actions.append(Action(BACKWARD_WEIGHT, weights, stage))
            weights += 1
    else:
        actions.append(Action(BACKWARD_WEIGHT, weights, stage))
        weights += 1
return actions
"""
_ZB_H1_ORDER = """
warmup = min(num_stages - stage - 1, num_microbatches)
order = [("F", k) for k in range(warmup)]
for k in range(num_microbatches - warmup):
    order += [("F", warmup + k), ("B", k)] + ([("W", k - stage)] if k >= stage else [])
done = sum(kind == "W" for kind, _ in order)
for k in range(num_microbatches - warmup, num_microbatches):
    order += [("B", k), ("W", done)]
    done += 1
order += [("W", k) for k in range(done, num_microbatches)]
actions = []
for kind, k in order:
    if kind == "W":
        actions.append(Action(BACKWARD_WEIGHT, k, stage))
    else:
        actions += (forward_actions if kind == "F" else split_backward_actions)(k, stage, num_stages)
return actions
"""
ZB_H1_PLANTED = (
    Planted("zb_h1", "no W delay: every W straight after its B", ZERO_BUBBLE,
            "        if step >= stage:  # W of micro-batch step - s: its B went s backwards ago\n",
            "        if step >= 0:  # W straight after its B\n", "ZB-H1 idles exactly p − 1"),
    Planted("zb_h1", "warm-up of p − s forwards (1F1B's count plus one)", ZERO_BUBBLE,
            "    warmup = min(num_stages - stage - 1, num_microbatches)\n",
            "    warmup = min(num_stages - stage, num_microbatches)\n", "ZB-H1 holds min(p, m)"),
    region("zb_h1", "B before its F in the steady state", ZERO_BUBBLE, {"zb_h1": _ZB_H1_B_BEFORE_F},
           "the simulator refuses the schedules"),
    Planted("zb_h1", "1F1B copied: whole backwards, no W", ZERO_BUBBLE,
            "        actions += split_backward_actions(step, stage, num_stages)\n",
            "        actions += backward_actions(step, stage, num_stages)\n", "runs a whole BACKWARD",
            more=(("from minipar.parallel.pipeline.schedules import (\n",
                   "from minipar.parallel.pipeline.schedules import (\n    backward_actions,\n"),)),
    Planted("zb_h1", "each W put off one backward too many (s + 1)", ZERO_BUBBLE,
            "        if step >= stage:  # W of micro-batch step - s: its B went s backwards ago\n",
            "        if step >= stage + 1:\n", "ZB-H1 holds min(p, m)"),
)

# ---- the pairwise all-to-all ---------------------------------------------------------------------
_ALLTOALL_START = """
flat_send, flat_out = _flat(send), _flat(out)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
(s0, s1), (r0, r1) = send_bounds[rank], receive_bounds[rank]
if s1 - s0 != r1 - r0:
    raise ShapeError(f"all-to-all: rank {rank} sends itself {s1 - s0} elements but expects {r1 - r0}")
flat_out[r0:r1] = flat_send[s0:s1]
"""
_ALLTOALL_BUILT_IN = """
flat_send, flat_out = _flat(send), _flat(out)
def spec(array, bounds):
    return [array, ([stop - start for start, stop in bounds], [start for start, _ in bounds])]
mpi_comm.Alltoallv(spec(flat_send, send_bounds), spec(flat_out, receive_bounds))
return alltoall_traffic(mpi_comm.Get_rank(), send_bounds, receive_bounds, flat_send.itemsize)
"""
_ALLTOALL_FLOAT64_WIRE = _ALLTOALL_START + """
traffic = Traffic()
for step in range(1, size):
    dest, source = (rank + step) % size, (rank - step) % size
    outgoing = flat_send[send_bounds[dest][0]:send_bounds[dest][1]].astype("float64")
    incoming = flat_out[receive_bounds[source][0]:receive_bounds[source][1]].astype("float64")
    mpi_comm.Sendrecv(outgoing, dest, 5, incoming, source, 5)
    flat_out[receive_bounds[source][0]:receive_bounds[source][1]] = incoming
    traffic += Traffic(outgoing.nbytes, incoming.nbytes)
return traffic
"""
_ALLTOALL_EQUAL_BLOCKS = """
flat_send, flat_out = _flat(send), _flat(out)
rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
out_block, in_block = flat_send.size // size, flat_out.size // size
flat_out[rank * in_block:(rank + 1) * in_block] = flat_send[rank * out_block:(rank + 1) * out_block]
traffic = Traffic()
for step in range(1, size):
    dest, source = (rank + step) % size, (rank - step) % size
    outgoing = flat_send[dest * out_block:(dest + 1) * out_block]
    incoming = flat_out[source * in_block:(source + 1) * in_block]
    mpi_comm.Sendrecv(outgoing, dest, 5, incoming, source, 5)
    traffic += Traffic(outgoing.nbytes, incoming.nbytes)
return traffic
"""
_ALLTOALL_NONBLOCKING = _ALLTOALL_START + """
requests, traffic = [], Traffic()
for step in range(1, size):
    source = (rank - step) % size
    incoming = flat_out[receive_bounds[source][0]:receive_bounds[source][1]]
    requests.append(mpi_comm.Irecv(incoming, source, 5))
    traffic += Traffic(0, incoming.nbytes)
for step in range(1, size):
    dest = (rank + step) % size
    outgoing = flat_send[send_bounds[dest][0]:send_bounds[dest][1]]
    requests.append(mpi_comm.Isend(outgoing, dest, 5))
    traffic += Traffic(outgoing.nbytes, 0)
for request in requests:
    request.Wait()
return traffic
"""
_ALLTOALL_XOR_SKIPPING_EMPTY = _ALLTOALL_START + """
traffic = Traffic()
for step in range(1, size):
    if size & (size - 1) == 0:
        dest = source = rank ^ step
    else:
        dest, source = (rank - step) % size, (rank + step) % size
    outgoing = flat_send[send_bounds[dest][0]:send_bounds[dest][1]]
    incoming = flat_out[receive_bounds[source][0]:receive_bounds[source][1]]
    if outgoing.size and incoming.size:
        mpi_comm.Sendrecv(outgoing, dest, 5, incoming, source, 5)
    elif outgoing.size:
        mpi_comm.Send(outgoing, dest, 5)
    elif incoming.size:
        mpi_comm.Recv(incoming, source, 5)
    traffic += Traffic(outgoing.nbytes, incoming.nbytes)
return traffic
"""
ALLTOALL_PLANTED = (
    Planted("pairwise_alltoall", "blocking Send then Recv at each step (deadlocks past the eager limit)", COLLECTIVES,
            "        mpi_comm.Sendrecv(outgoing, dest, _ALL_TO_ALL_TAG, incoming, source, _ALL_TO_ALL_TAG)\n",
            "        mpi_comm.Send(outgoing, dest, _ALL_TO_ALL_TAG)\n        mpi_comm.Recv(incoming, source, "
            "_ALL_TO_ALL_TAG)\n", "deadlock: ranks", limit=15),
    region("pairwise_alltoall", "MPI's built-in Alltoallv", COLLECTIVES, {"pairwise_alltoall": _ALLTOALL_BUILT_IN},
           "called MPI's Alltoallv"),
    region("pairwise_alltoall", "float64 scratch buffers in a float32 exchange", COLLECTIVES,
           {"pairwise_alltoall": _ALLTOALL_FLOAT64_WIRE}, "moved float64 in a float32 all-to-all"),
    Planted("pairwise_alltoall", "near miss: each received block off by 1e-9 relative", COLLECTIVES,
            "incoming, source, _ALL_TO_ALL_TAG)\n",
            "incoming, source, _ALL_TO_ALL_TAG)\n        incoming *= 1 + 1e-9\n", "out element"),
    Planted("pairwise_alltoall", "the own block never copied", COLLECTIVES,
            "    flat_out[mine_start:mine_stop] = flat_send[own_start:own_stop]\n", "",
            "nothing arrived in this slot"),
    region("pairwise_alltoall", "equal blocks assumed (n/N each)", COLLECTIVES,
           {"pairwise_alltoall": _ALLTOALL_EQUAL_BLOCKS}, "uneven blocks"),
)

# ---- ring attention ------------------------------------------------------------------------------
_RING_STEP_NONBLOCKING = """
rank, size = communicator.rank, communicator.size
requests = []
if step < size - 1 and overlap:
    requests = [communicator.isend(in_hand, (rank + 1) % size, KV_TAG),
                communicator.irecv(arriving, (rank - 1) % size, KV_TAG)]
attend((rank - step) % size)
if step < size - 1 and not overlap:
    requests = [communicator.irecv(arriving, (rank - 1) % size, KV_TAG),
                communicator.isend(in_hand, (rank + 1) % size, KV_TAG)]
for request in reversed(requests):
    request.wait()
"""
RING_ATTENTION_PLANTED = (
    Planted("ring_attention", "the running output rescaled by exp(l1 − m), not exp(l1 − l)", CONTEXT,
            "    out *= xp.exp(log_sum_exp - merged)[..., None]\n", "    out *= xp.exp(log_sum_exp - m)[..., None]\n",
            "out, element"),
    Planted("ring_attention", "no max shift in the log-sum-exp (exp overflows for large logits)", CONTEXT,
            "    merged = m + xp.log(xp.exp(log_sum_exp - m) + xp.exp(partial_log_sum_exp - m))\n",
            "    merged = xp.log(xp.exp(log_sum_exp) + xp.exp(partial_log_sum_exp))\n", "logits near +1000"),
    Planted("ring_attention", "near miss: the log-sum-exp off by 1e-9 relative", CONTEXT,
            "    log_sum_exp[...] = merged\n", "    log_sum_exp[...] = merged * (1 + 1e-9)\n",
            "log_sum_exp, element"),
    Planted("ring_attention", "out rebound to a new array instead of updated in place", CONTEXT,
            "    out *= xp.exp(log_sum_exp - merged)[..., None]\n    out += xp.exp",
            "    out = out * xp.exp(log_sum_exp - merged)[..., None]\n    out = out + xp.exp", "out, element"),
    Planted("ring_attention", "blocking send then receive at each step (deadlocks past the eager limit)", CONTEXT,
            "        communicator.sendrecv(in_hand, to_next, arriving, from_previous, KV_TAG)\n",
            "        communicator.isend(in_hand, to_next, KV_TAG).wait()\n"
            "        communicator.irecv(arriving, from_previous, KV_TAG).wait()\n", "deadlock: ranks", limit=15),
    Planted("ring_attention", "the block in hand taken for rank r − s − 1's (causal blocks off by one)", CONTEXT,
            "    attend((rank - step) % size)\n", "    attend((rank - step - 1) % size)\n", "output, element"),
    Planted("ring_attention", "the block passed on the last step too (N messages)", CONTEXT,
            "    last = step == size - 1\n    requests = []\n", "    last = False\n    requests = []\n",
            "the ring passes the K/V block on N − 1"),
    Planted("ring_attention", "the ring turned the other way for K/V only", CONTEXT,
            "    to_next, from_previous = (rank + 1) % size, (rank - 1) % size\n",
            "    to_next, from_previous = (rank - 1) % size, (rank + 1) % size\n", "the block goes to rank r + 1",
            more=(("    attend((rank - step) % size)\n", "    attend((rank + step) % size)\n"),)),
)
MORE_PLANTED = MORE_PLANTED + ZB_H1_PLANTED + ALLTOALL_PLANTED + RING_ATTENTION_PLANTED
PLANTED = PLANTED + MORE_PLANTED

ALTERNATIVES = (
    Planted("layer_norm_backward", "dL/dx from the mean of the upstream gradient and x_hat, written out", FUSED,
            "        g_hat = grad * weight\n        grad_x = inverse_std * (g_hat - g_hat.mean(axis=-1, keepdims=True)\n"
            "                                - x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True))\n",
            "        g_hat = grad * weight\n        width = g_hat.shape[-1]\n"
            "        grad_x = (inverse_std / width) * (width * g_hat - g_hat.sum(axis=-1, keepdims=True)\n"
            "                                          - x_hat * (g_hat * x_hat).sum(axis=-1, keepdims=True))\n", ""),
    Planted("layer_norm_backward", "weight and bias gradients summed over every axis but the last", FUSED,
            "        grad_weight = (rows * x_hat.reshape(rows.shape)).sum(axis=0)\n        grad_bias = rows.sum(axis=0)\n",
            "        axes = tuple(range(grad.ndim - 1))\n        grad_weight = (grad * x_hat).sum(axis=axes)\n"
            "        grad_bias = grad.sum(axis=axes)\n", ""),

    region("ring_allreduce", "the mirrored ring (to r - 1, from r + 1), Sendrecv", COLLECTIVES,
           {"ring_reduce_scatter": _MIRRORED_REDUCE_SCATTER, "ring_all_gather": _MIRRORED_ALL_GATHER}, ""),
    region("ring_allreduce", "Isend/Irecv with Waitall and Wait", COLLECTIVES,
           {"ring_reduce_scatter": _NONBLOCKING_REDUCE_SCATTER, "ring_all_gather": _NONBLOCKING_ALL_GATHER}, ""),
    region("ring_allreduce", "blocking Send/Recv ordered even/odd", COLLECTIVES,
           {"ring_reduce_scatter": _EVEN_ODD_REDUCE_SCATTER}, ""),

    Planted("recursive_doubling", "each round with Isend/Irecv", COLLECTIVES,
            "        mpi_comm.Sendrecv(flat, partner, tag, incoming, partner, tag)\n",
            "        requests = [mpi_comm.Irecv(incoming, partner, tag), mpi_comm.Isend(flat, partner, tag)]\n"
            "        for request in requests:\n            request.Wait()\n", ""),
    Planted("recursive_doubling", "each round with Send/Recv, the lower rank sending first", COLLECTIVES,
            "        mpi_comm.Sendrecv(flat, partner, tag, incoming, partner, tag)\n",
            "        if rank < partner:\n            mpi_comm.Send(flat, partner, tag)\n"
            "            mpi_comm.Recv(incoming, partner, tag)\n        else:\n"
            "            mpi_comm.Recv(incoming, partner, tag)\n            mpi_comm.Send(flat, partner, tag)\n", ""),

    region("process_grid", "coordinates by divmod", TOPOLOGY, {"Layout.coordinates": """
rest, tp_rank = divmod(rank, self.tp)
pp_rank, dp_rank = divmod(rest, self.dp)
return dp_rank, tp_rank, pp_rank
"""}, ""),
    region("process_grid", "each group's colour is its first member's world rank", TOPOLOGY,
           {"ProcessGrid.__init__": """
layout.validate(world.size)
self.layout, self.world = layout, world
self.dp_rank, self.tp_rank, self.pp_rank = layout.coordinates(world.rank)
self.tp = world.split(color=layout.rank_of(self.dp_rank, 0, self.pp_rank), key=self.tp_rank)
self.dp = world.split(color=layout.rank_of(0, self.tp_rank, self.pp_rank), key=self.dp_rank)
self.pp = world.split(color=layout.rank_of(self.dp_rank, self.tp_rank, 0), key=self.pp_rank)
"""}, ""),

    Planted("megatron_f_g", "f and g through the communicator's allreduce on a copy", TP_COMM,
            "        return allreduce_sum(grad, ctx.communicator)\n",
            "        total = xp.ascontiguousarray(grad).copy()\n        ctx.communicator.allreduce(total)\n"
            "        return total\n", "",
            more=(("        return allreduce_sum(partial, communicator)\n",
                   "        total = xp.ascontiguousarray(partial).copy()\n        communicator.allreduce(total)\n"
                   "        return total\n"),)),
    region("megatron_f_g", "the biases added after the matmul, in the other order", TP_LAYERS, {
        "ColumnParallelLinear.forward": """
y = ops.linear(self.region.enter(x), self.weight)
return y if self.bias is None else y + self.bias
""",
        "RowParallelLinear.forward": """
out = self.region.leave(ops.linear(x, self.weight))
if self.bias is None:
    return out
return self.bias + out
"""}, ""),

    region("vocab_parallel_loss", "Σ exp and the target logit in one allreduce", TP_COMM,
           {"VocabParallelCrossEntropy.forward": _VOCAB_ONE_ALLREDUCE_FOR_TWO}, ""),
    Planted("vocab_parallel_loss", "the target's shard found from its local index", TP_COMM,
            "        mine = (flat_targets >= vocab_start) & (flat_targets < vocab_start + local_vocab)\n"
            "        local_targets = xp.where(mine, flat_targets - vocab_start, 0)  # 0 is a placeholder where not mine\n",
            "        local = flat_targets - vocab_start\n        mine = (0 <= local) & (local < local_vocab)\n"
            "        local_targets = local * mine\n", ""),

    Planted("data_parallel", "the average as a product with 1/N", DATA_PARALLEL,
            ("slot.parameter.grad = summed / self.comm.size", "bucket.flat /= self.comm.size  # Σ_i"),
            ("slot.parameter.grad = summed * (1.0 / self.comm.size)", "bucket.flat *= 1.0 / self.comm.size  # Σ_i"),
            ""),
    Planted("data_parallel", "no progress tests in the hook (MPI progresses at the waits)", DATA_PARALLEL,
            "        for bucket in self.buckets[:self._next_launch]:\n            bucket.request.test()\n", "", ""),

    region("one_f_one_b", "one loop with counters of forwards and backwards", SCHEDULES,
           {"one_f_one_b": _ONE_F_ONE_B_COUNTERS}, ""),
    region("one_f_one_b", "the order as a list of (F/B, micro-batch), then the actions", SCHEDULES,
           {"one_f_one_b": _ONE_F_ONE_B_ORDER}, ""),

    Planted("pipeline_messages", "the received array copied with xp.array", EXECUTOR,
            "        fresh = buffer.copy()  # owned by the graph; the buffer goes straight back to MPI\n",
            "        fresh = xp.array(buffer, copy=True)\n", ""),
    Planted("pipeline_messages", "a fresh send buffer for every message", EXECUTOR,
            "        buffer = self._free_send_buffer(action)\n        buffer[...] = payload\n",
            "        buffer = xp.ascontiguousarray(payload).copy()\n", ""),

    region("zero_1", "rows by padding the flat array", ZERO, {"Zero._rows": """
flat = array.reshape(-1)
padded = xp.pad(flat, (0, self.count * part_length(p.size, self.count) - flat.size))
return padded.reshape(self.count, -1)
"""}, ""),
    Planted("zero_1", "divide by N before the reduce-scatter", ZERO,
            "        self.comm.reduce_scatter(rows.reshape(-1), gradient)\n        gradient /= self.count\n",
            "        rows /= self.count\n        self.comm.reduce_scatter(rows.reshape(-1), gradient)\n", ""),
    region("zb_h1", "one loop with counters of F, B and W", ZERO_BUBBLE, {"zb_h1": _ZB_H1_COUNTERS}, ""),
    region("zb_h1", "the order as a list of (F/B/W, micro-batch), then the actions", ZERO_BUBBLE,
           {"zb_h1": _ZB_H1_ORDER}, ""),
    region("pairwise_alltoall", "every Irecv posted, then every Isend, then Wait", COLLECTIVES,
           {"pairwise_alltoall": _ALLTOALL_NONBLOCKING}, ""),
    region("pairwise_alltoall", "XOR partners on a power of two, else the other shift; empty blocks skipped",
           COLLECTIVES, {"pairwise_alltoall": _ALLTOALL_XOR_SKIPPING_EMPTY}, ""),
    region("ring_attention", "the merge with logaddexp, the output rebuilt in place", CONTEXT, {"merge_partials": """
merged = xp.logaddexp(log_sum_exp, partial_log_sum_exp)
out[...] = xp.exp(log_sum_exp - merged)[..., None] * out + xp.exp(partial_log_sum_exp - merged)[..., None] * partial
log_sum_exp[...] = merged
"""}, ""),
    region("ring_attention", "Isend/Irecv on every step, posted after attending when there is no overlap", CONTEXT,
           {"ring_step": _RING_STEP_NONBLOCKING}, ""),
)
