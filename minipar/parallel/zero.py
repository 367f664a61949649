"""ZeRO: shard the optimizer state, the gradients and the parameters over the data-parallel group.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models".
Data parallelism keeps N identical copies of everything; ZeRO keeps one copy cut into N parts,
part d on dp rank d, and brings the other parts in only while they are needed:

    stage 1, P_os      AdamW's m and v: each rank keeps and updates only its part
    stage 2, P_os+g    ... and the averaged gradient: a full gradient is freed once sent
    stage 3, P_os+g+p  ... and the parameters: gathered for a piece's forward and backward only

Memory per rank, Ψ parameters on this rank (its tensor- and pipeline-parallel share), N the dp size. The paper
counts mixed-precision Adam: fp16 parameters 2Ψ and gradients 2Ψ, K = 12 bytes per parameter of fp32 optimizer
state (master copy, m, v); so does ``--precision bf16|fp16`` (mixed_precision.py). In fp32 minipar holds the
parameters 4Ψ, gradients 4Ψ, AdamW's m and v 8Ψ (``ZeroState.memory_report``, zero_state.py, measures these):

    bytes per rank       paper, mixed precision (K = 12)    minipar, fp32 AdamW
    data parallelism     (2 + 2 + K)Ψ = 16Ψ                 (4 + 4 + 8)Ψ = 16Ψ
    stage 1, P_os        4Ψ + KΨ/N = 4Ψ + 12Ψ/N             8Ψ + 8Ψ/N
    stage 2, P_os+g      2Ψ + 14Ψ/N                         4Ψ + 12Ψ/N
    stage 3, P_os+g+p    16Ψ/N                              16Ψ/N

(With sizes N does not divide, Ψ becomes the padded count below.) Stage 1 holds every full
gradient at the end of backward, as the paper counts it; stages 2-3 hold about one piece's.

Micro-batches. With m micro-batches per step stages 2-3 reduce-scatter each unit after every
micro-batch and add the averaged result into its part (as DeepSpeed's stage 2 does), so the
full gradients never outlive one micro-batch's backward and the table holds whatever m is; the
price is m reduce-scatters per step instead of one, $m(N−1)/N Ψ$ bytes. Stage 1 keeps the full
gradients summed over the micro-batches and reduce-scatters once, as its row of the table says.

Parts. A parameter (this rank's tensor-parallel shard of it) of n numbers is read flat, padded
with zeros to N s numbers, s = ceil(n / N), and rank d owns [d s, (d+1) s) (per-parameter
sharding, as in PyTorch's FSDP2). Every rank holding the parameter cuts it alike, so a part is
the same positions everywhere: the sequence-parallel gradient sum over tp and the tied-embedding
sum across pipeline stages, both elementwise, hold on parts as on whole arrays. The padding
gets zero gradients and AdamW leaves it at zero. Each part is a Parameter of its own, kept
here; the optimizer updates the parts (``updated``). One step, g_i the gradient of dp rank i:

    backward        g_i at full size (stage 3: each piece's parameters gathered for it)
    reduce-scatter  rank d gets its part of ḡ = (1/N) Σ_i g_i; stage 1 after backward,
                    stages 2-3 during it, as soon as a unit's gradients of a micro-batch are final
    clip, AdamW     on the parts alone; AdamW is elementwise, so N ranks updating N parts is
                    the update of the whole:  θ_d <- θ_d - η u(ḡ_d, m_d, v_d)
    all-gather      stages 1-2: the updated parts rebuild θ everywhere; stage 3: nothing

Traffic per step, Ψ = bytes of this rank's parameters, ring collectives: a reduce-scatter and
an all-gather send $(N−1)/N Ψ$ each, $2(N−1)/N Ψ$ together, exactly data parallelism's allreduce,
which *is* a reduce-scatter then an all-gather. Stage 3 gathers twice (forward and backward):
$3(N−1)/N Ψ$, 1.5 times as much (the paper, section 7). Parameters travel in units, one
collective each: a piece's own parameters, or one parameter shared by two pieces of this rank
(the tied embedding when one stage holds embedding and head). A unit's buffer is rank-major,
[part 0 of each parameter | part 1 of each | ...], as MPI_Reduce_scatter_block and
MPI_Allgather cut and join it.

Gradient copies per step: one in, none out, as in PyTorch FSDP2. The parts' .grad are views of
each reduce-scatter's output, averaged there in place once; ``_gradient_rows`` copies each full
gradient once into the rank-major buffer (no array shaped like p can view its N blocks there).
docs/zero.md, "Gradient copies", says why that copy stays and what removing it would cost.

What a parameter is does not change: p.shape is its tensor-parallel shard's shape in every
stage. In stages 1-2 p.data is the whole shard (a view into its padded buffer, which the part
also views). In stage 3 p.data is the whole shard inside its piece's forward and backward and
a stand-in between them: an array of that shape holding one NaN, so a use outside a gather
shows up in the loss instead of passing silently. After ``finish_gradient_sync`` p.grad is None
(the full gradient is freed) and the part's .grad holds this rank's part of the average.

Stage 3 needs recomputation: the engine keeps in each op's context what its backward needs,
for a matmul the full weight, so a piece run with its graph recorded would keep its gathered
weights alive until its backward. So a stage-3 piece runs its forward under no_grad (gather,
compute, release) keeping only its input; its backward gathers again, reruns the forward with
the graph, backpropagates through it and releases (parallel/zero_gather.py). The chunks call
their pieces through ``run_gathered`` (``PipelineChunk.piece_runner``), so the pieces
themselves stay as they are.

Overlap (``overlap=True``, ``--overlap``; PyTorch FSDP and DeepSpeed do the same). Each unit's reduce-
scatter starts (MPI_Ireduce_scatter_block) at the grad-ready hook that completes it, in every stage
(stage 1: during the last micro-batch), and backward carries on with earlier layers; at most
``MAX_REDUCE_SCATTERS_IN_FLIGHT`` send buffers (full-size) are held at once, the oldest finished first,
and ``finish_gradient_sync`` waits for the rest. Stage 3 also prefetches: while a piece computes, the
all-gather of the piece that runs next (the following one in forward, the previous one in backward) is
in flight (MPI_Iallgather), so two pieces' parameters are gathered at once. Results are added in the
order they were sent, on every rank, so overlap changes when bytes move, not the numbers.
"""
from minipar.backend import xp
from minipar.errors import ConfigError
from minipar.parallel.gradient_sync import SingleReplica, bytes_held
from minipar.parallel.zero_gather import GatheredPieces, order_of_pieces
from minipar.parallel.zero_state import ZeroState
from minipar.parallel.zero_units import Unit, make_units, part_length  # noqa: F401 (Unit: re-exported)

MAX_REDUCE_SCATTERS_IN_FLIGHT = 2  # --overlap: at most this many send buffers (full-size) held at once


class Zero(GatheredPieces, SingleReplica):
    """ZeRO ``stage`` (1, 2 or 3) over ``dp_comm`` for the parameters of this rank's ``chunks``.

        zero = Zero(chunks, grid.dp, stage=3, accumulation_steps=m)
        for chunk in chunks: chunk.piece_runner = zero.piece_runner     # stage 3 gathers per piece
        optimizer = AdamW(zero.optimizer_groups(decay_groups(named_parameters, wd)), ...)
        zero.start_step(); <m forward/backward passes>; zero.finish_gradient_sync()
        <clip zero.updated; optimizer.step()>; zero.after_optimizer_step(step)

    The gradient-synchronisation interface of ``parallel/gradient_sync.py``.
    """

    def __init__(self, chunks, dp_comm, stage, accumulation_steps=1, overlap=False):
        if stage not in (1, 2, 3):
            raise ConfigError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}")
        self.comm, self.stage, self.count, self.rank = dp_comm, stage, dp_comm.size, dp_comm.rank
        self.overlap = overlap
        self.in_flight = []  # --overlap: (unit, request, send buffer, result), oldest first
        self.prefetched = {}  # --overlap, stage 3: {id(unit): (request, send buffer, rows)} of started all-gathers
        self.runs_next = order_of_pieces(chunks) if overlap and stage == 3 else {}  # stage 3's prefetch
        self.partitioned_over = (dp_comm,)  # each rank updates its own parts
        self.units, self.units_of_piece, piece_uses = make_units(
            [piece for chunk in chunks for piece in chunk.pieces], self.count)
        super().__init__([p for unit in self.units for p in unit.parameters])
        self.unit_of = {id(p): unit for unit in self.units for p in unit.parameters}
        self.parts, self.padded, self.stand_in = {}, {}, {}
        for unit in self.units:
            self._make_parts(unit)
        self.part_list = [self.parts[id(p)] for p in self.parameters]
        # A micro-batch's gradient of p is complete after one grad-ready hook per backward p is in.
        chunk_uses = {id(p): sum(any(p is q for q in c.parameters()) for c in chunks) for p in self.parameters}
        uses = piece_uses if stage == 3 else chunk_uses  # stage 3 runs one backward per piece
        self.uses_per_micro_batch = {id(p): uses[id(p)] for p in self.parameters}
        self.expected_firings = {id(p): accumulation_steps * uses[id(p)] for p in self.parameters}
        if stage >= 2 or overlap:  # stage 1 without overlap sends everything after backward
            for p in self.parameters:
                p.register_grad_ready_hook(self.gradient_ready)
        self.piece_runner = self.run_gathered if stage == 3 else None
        self.state = ZeroState(self)  # checkpoints see whole shards; memory measured from the parts
        self.start_step()

    def _rows(self, p, array):
        """An array shaped like p, flat, zero-padded, as (N, s): row d is rank d's part."""
        ### BEGIN SOLUTION
        rows = xp.zeros((self.count, part_length(p.size, self.count)), dtype=array.dtype)
        rows.reshape(-1)[:array.size] = array.reshape(-1)
        return rows
        ### END SOLUTION

    def _make_parts(self, unit):
        storage = xp.empty(unit.length, dtype=unit.parameters[0].dtype) if self.stage == 3 else None
        for p, place in unit.slots():
            rows = self._rows(p, p.data)
            if self.stage == 3:  # only the part stays; p.data is a stand-in between uses
                storage[place] = rows[self.rank]
                part = type(p)(storage[place])
                self.stand_in[id(p)] = xp.broadcast_to(xp.asarray(xp.nan, dtype=p.dtype), p.shape)
                p.data = self.stand_in[id(p)]
            else:  # p.data and the part view one padded buffer, so the gather after AdamW shows in p.data
                self.padded[id(p)] = rows
                p.data = rows.reshape(-1)[:p.size].reshape(p.shape)
                part = type(p)(rows[self.rank])
            part.shard = p.shard  # the same tensor-parallel description (replicated? tied?)
            self.parts[id(p)] = part

    @property
    def updated(self):
        return self.part_list

    def updated_tensor(self, parameter):
        return self.parts[id(parameter)]

    def optimizer_groups(self, groups):
        """Optimizer groups over the parts, from groups over the parameters (options kept)."""
        return [{**group, "params": [self.parts[id(p)] for p in group["params"]]} for group in groups]

    # ---- gradients -------------------------------------------------------------------------
    def start_step(self):
        self._complete_reduce_scatters()  # a step abandoned with sends in flight: finish them everywhere
        self.firings = {}
        self.peak_full_gradients = self.peak_gathered_parameters = 0
        for unit in self.units:
            unit.final, unit.sent, unit.gradient = 0, False, None
        for p in self.parameters:
            p.grad = self.parts[id(p)].grad = None

    def gradient_ready(self, p):
        """Grad-ready hook: reduce-scatter a unit once its gradients of a micro-batch are complete
        (stages 2-3: after every micro-batch; stage 1 with --overlap: after the last one)."""
        firings = self.firings[id(p)] = self.firings.get(id(p), 0) + 1
        if firings > self.expected_firings[id(p)]:
            raise RuntimeError(f"{p.shard.full_name} got a gradient {firings} times in one step, expected "
                               f"{self.expected_firings[id(p)]}: call finish_gradient_sync() once per step")
        self._note_full_gradients()
        complete = firings == self.expected_firings[id(p)] if self.stage == 1 else \
            firings % self.uses_per_micro_batch[id(p)] == 0
        if complete:
            unit = self.unit_of[id(p)]
            unit.final += 1
            if unit.final == len(unit.parameters):
                self._send(unit)
        # Without a progress thread MPI advances nonblocking calls only inside MPI calls.
        for request in [entry[1] for entry in self.in_flight] + [entry[0] for entry in self.prefetched.values()]:
            request.test()

    def _note_full_gradients(self):
        """Full-size gradients held now: the .grad arrays, and (--overlap) the send buffers in flight."""
        held = bytes_held(p.grad for p in self.parameters) + sum(rows.nbytes for _, _, rows, _ in self.in_flight)
        self.peak_full_gradients = max(self.peak_full_gradients, held)

    def _gradient_rows(self, unit):
        """The unit's reduce-scatter input (N, S): row d is ``_rows``' row d of each full gradient, side
        by side, each copied in once (module docstring); the full gradients are freed."""
        only = unit.parameters[0]
        if len(unit.parameters) == 1 and only.grad is not None and only.size == self.count * unit.length:
            rows, only.grad = only.grad.reshape(self.count, unit.length), None
            return rows
        rows = xp.empty((self.count, unit.length), dtype=only.dtype)
        for p, place in unit.slots():
            block = rows[:, place]  # (N, s), strided by S: row d is p's part d
            if p.grad is None:  # no gradient reached p on this rank: it contributes zeros
                block[...] = 0
            else:
                length, flat = block.shape[1], p.grad.reshape(-1)
                whole, rest = divmod(p.size, length)  # rows that p's numbers fill, then rest numbers
                block[:whole] = flat[:whole * length].reshape(whole, length)
                block[whole:] = 0  # the padding, and the partial row written next
                if rest:
                    block[whole, :rest] = flat[whole * length:]
            p.grad = None
        return rows

    def _send(self, unit):
        """Reduce-scatter what the unit's full gradients hold now and free them; blocking, or
        (--overlap) started here and added to the parts when it completes."""
        unit.final = 0
        if not self.overlap:
            self._reduce_scatter(unit)
            return
        rows = self._gradient_rows(unit)
        result = xp.empty(unit.length, dtype=rows.dtype)
        self.in_flight.append((unit, self.comm.ireduce_scatter(rows.reshape(-1), result), rows, result))
        unit.sent = True
        # Bound the send buffers held: finish the oldest beyond the limit (usually done by now).
        self._complete_reduce_scatters(keep=MAX_REDUCE_SCATTERS_IN_FLIGHT)

    def _complete_reduce_scatters(self, keep=0):
        """Wait for all but the ``keep`` newest reduce-scatters in flight, oldest first, and add each
        averaged result to its unit's parts (in the order they were sent, on every rank)."""
        while len(self.in_flight) > keep:
            unit, request, _, result = self.in_flight.pop(0)
            request.wait()
            result /= self.count
            self._add_to_parts(unit, result)

    def _add_to_parts(self, unit, gradient):
        """The parts' .grad view the unit's one (S,) buffer; a later send (micro-batch) adds into it."""
        if unit.gradient is None:
            unit.gradient = gradient
            for p, place in unit.slots():
                self.parts[id(p)].grad = gradient[place]
        else:
            unit.gradient += gradient

    def _reduce_scatter(self, unit):
        """$ḡ_d = (1/N) Σ_i g_i$ on this rank's parts; each full gradient is freed once packed."""
        ### BEGIN SOLUTION
        rows = self._gradient_rows(unit)
        gradient = xp.empty(unit.length, dtype=rows.dtype)
        self.comm.reduce_scatter(rows.reshape(-1), gradient)
        gradient /= self.count
        self._add_to_parts(unit, gradient)
        unit.sent = True
        ### END SOLUTION

    def finish_gradient_sync(self):
        """Reduce-scatter every unit not yet sent (all of them in stage 1 without overlap) or still
        holding gradients (a micro-batch that did not reach all its parameters): each part's .grad
        is then its average."""
        self._note_full_gradients()
        for unit in self.units:  # in unit order: every dp rank starts the same collectives in the same order
            if not unit.sent or any(p.grad is not None for p in unit.parameters):
                self._send(unit)
        self._complete_reduce_scatters()

    # ---- parameters ------------------------------------------------------------------------
    def _all_gather(self, unit, parts):
        """(N, S): row r holds rank r's parts of the unit's parameters."""
        rows = xp.empty((self.count, unit.length), dtype=parts[0].dtype)
        self.comm.allgather(xp.concatenate(parts), rows.reshape(-1))
        return rows

    def _full(self, p, rows, place):
        """The array shaped like ``p`` from gathered rows (a copy, padding cut)."""
        return rows[:, place].reshape(-1)[:p.size].reshape(p.shape)

    def after_optimizer_step(self, step):
        """Stages 1-2: all-gather the updated parts into every rank's whole parameters."""
        ### BEGIN SOLUTION
        if self.stage < 3:
            for unit in self.units:
                rows = self._all_gather(unit, [self.parts[id(p)].data for p in unit.parameters])
                for p, place in unit.slots():
                    self.padded[id(p)][...] = rows[:, place]
        ### END SOLUTION
