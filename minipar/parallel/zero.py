"""ZeRO: shard the optimizer state, the gradients and the parameters over the data-parallel group.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models".
Data parallelism keeps N identical copies of everything; ZeRO keeps one copy cut into N parts,
part d on dp rank d, and brings the other parts in only while they are needed:

    stage 1, P_os      AdamW's m and v: each rank keeps and updates only its part
    stage 2, P_os+g    ... and the averaged gradient: a full gradient is freed once sent
    stage 3, P_os+g+p  ... and the parameters: gathered for a piece's forward and backward only

Parts. A parameter (this rank's tensor-parallel shard of it) of n numbers is read flat, padded
with zeros to N s numbers, s = ceil(n / N), and rank d owns [d s, (d+1) s) (per-parameter
sharding, as in PyTorch's FSDP2). Every rank holding the parameter cuts it alike, so a part is
the same positions everywhere: the sequence-parallel gradient sum over tp and the tied-embedding
sum across pipeline stages, both elementwise, hold on parts as on whole arrays. The padding
gets zero gradients and AdamW leaves it at zero. One step, g_i the gradient of dp rank i:

    backward        g_i at full size (stage 3: each piece's parameters gathered for it)
    reduce-scatter  rank d gets its part of ḡ = (1/N) Σ_i g_i; stage 1 after backward,
                    stages 2-3 during it, as soon as a unit's gradients are final
    clip, AdamW     on the parts alone; AdamW is elementwise, so N ranks updating N parts is
                    the update of the whole:  θ_d <- θ_d - η u(ḡ_d, m_d, v_d)
    all-gather      stages 1-2: the updated parts rebuild θ everywhere; stage 3: nothing

Traffic per step, Ψ = bytes of this rank's parameters, ring collectives: a reduce-scatter and
an all-gather send (N-1)/N Ψ each, 2(N-1)/N Ψ together, exactly data parallelism's allreduce,
which *is* a reduce-scatter then an all-gather. Stage 3 gathers twice (forward and backward):
3(N-1)/N Ψ, 1.5 times as much (the paper, section 7). Parameters travel in units, one
collective each: a piece's own parameters, or one parameter shared by two pieces of this rank
(the tied embedding when one stage holds embedding and head). A unit's buffer is rank-major,
[part 0 of each parameter | part 1 of each | ...], as MPI_Reduce_scatter_block and
MPI_Allgather cut and join it.

Stage 3 needs recomputation: the engine keeps in each op's context what its backward needs,
for a matmul the full weight, so a piece run with its graph recorded would keep its gathered
weights alive until its backward, whatever p.data says. So a stage-3 piece runs its forward
under no_grad (gather, compute, release) keeping only its input; its backward gathers again,
reruns the forward with the graph, backpropagates through it and releases.

p.grad under ZeRO: after ``finish_gradient_sync`` it is this rank's part of the averaged
gradient, flat (s,), the very array its part Parameter holds as .grad; clipping and AdamW act
on the parts. p.data is the full tensor-parallel shard in stages 1-2 (a view into its padded
buffer), and in stage 3 the part itself except inside a piece's forward or backward.
"""
from contextlib import contextmanager

from minipar.backend import xp
from minipar.errors import ConfigError
from minipar.nn.module import Module
from minipar.parallel.tensor_parallel import finish_tensor_parallel_gradients
from minipar.tensor import Function, Tensor, is_grad_enabled, no_grad


def part_length(size, count):
    """s = ceil(n / N): each of N ranks owns s numbers of a parameter of n, padded to N s."""
    return -(-size // count)


def bytes_held(arrays):
    """Bytes of memory behind ``arrays``, each buffer once (a view counts its whole base)."""
    owners = {}
    for array in arrays:
        if array is not None:
            owner = array if array.base is None else array.base
            owners[id(owner)] = owner.nbytes
    return sum(owners.values())


class Unit:
    """Parameters that are reduce-scattered and all-gathered together, by one call each."""

    def __init__(self, parameters, count):
        self.parameters = parameters
        lengths = [part_length(p.size, count) for p in parameters]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        self.places = [slice(start, start + length) for start, length in zip(starts, lengths)]
        self.length = sum(lengths)  # S: this rank's part of every parameter of the unit
        self.final = 0  # parameters whose gradient is final in this step
        self.gradient = None  # (S,): the averaged parts after the reduce-scatter

    def slots(self):
        return zip(self.parameters, self.places)


def make_units(pieces, count):
    """One unit per piece for its own parameters, one per parameter shared by pieces; and
    {id(piece): the units it needs}, {id(p): how many pieces use p}."""
    uses = {}
    for piece in pieces:
        for p in piece.parameters():
            uses[id(p)] = uses.get(id(p), 0) + 1
    units, needs, alone = [], {}, {}
    for piece in pieces:
        own = [p for p in piece.parameters() if uses[id(p)] == 1]
        needs[id(piece)] = [Unit(own, count)] if own else []
        units += needs[id(piece)]
        for p in (p for p in piece.parameters() if uses[id(p)] > 1):
            if id(p) not in alone:
                units.append(alone.setdefault(id(p), Unit([p], count)))
            needs[id(piece)].append(alone[id(p)])
    return units, needs, uses


class Zero:
    """ZeRO ``stage`` (1, 2 or 3) over ``dp_comm`` for the parameters of this rank's ``chunks``.

        zero = Zero(chunks, grid.dp, stage=2, accumulation_steps=m)
        optimizer = AdamW(zero.part_groups(decay_groups(named_parameters, wd)), ...)
        zero.start_step(); <m forward/backward passes>; zero.finish_gradient_sync()
        <clip the parts; optimizer.step()>; zero.finish_step()

    Stage 3 replaces each piece of ``chunks`` by a ``GatheredPiece``.
    """

    def __init__(self, chunks, dp_comm, stage, accumulation_steps=1):
        if stage not in (1, 2, 3):
            raise ConfigError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}")
        self.comm, self.stage, self.count, self.rank = dp_comm, stage, dp_comm.size, dp_comm.rank
        self.units, needs, piece_uses = make_units([piece for chunk in chunks for piece in chunk.pieces], self.count)
        self.parameters = [p for unit in self.units for p in unit.parameters]
        self.unit_of = {id(p): unit for unit in self.units for p in unit.parameters}
        self.shape = {id(p): p.shape for p in self.parameters}  # p.shape and p.size mislead in stage 3
        self.numbers = {id(p): p.size for p in self.parameters}
        self.parts, self.padded = {}, {}
        for unit in self.units:
            self._make_parts(unit)
        self.part_list = [self.parts[id(p)] for p in self.parameters]
        self.optimizer, self.report = None, {}  # the trainer sets the AdamW over the parts
        if stage >= 2:  # a gradient is final at its last grad-ready hook of the step: one per backward it is in
            chunk_uses = {id(p): sum(any(p is q for q in c.parameters()) for c in chunks) for p in self.parameters}
            uses = piece_uses if stage == 3 else chunk_uses  # stage 3 runs one backward per piece
            self.expected_firings = {id(p): accumulation_steps * uses[id(p)] for p in self.parameters}
            for p in self.parameters:
                p.register_grad_ready_hook(self._on_gradient_ready)
        if stage == 3:
            for chunk in chunks:
                chunk.pieces = [GatheredPiece(piece, self, needs[id(piece)]) for piece in chunk.pieces]
        self.start_step()

    def _rows(self, p, array):
        """An array shaped like p's tensor-parallel shard, flat, zero-padded, as (N, s): row d is rank d's part."""
        rows = xp.zeros((self.count, part_length(self.numbers[id(p)], self.count)), dtype=array.dtype)
        rows.reshape(-1)[:array.size] = array.reshape(-1)
        return rows

    def _make_parts(self, unit):
        storage = xp.empty(unit.length, dtype=unit.parameters[0].dtype) if self.stage == 3 else None
        for p, place in unit.slots():
            rows = self._rows(p, p.data)
            if self.stage == 3:  # only the part stays; p.data is the part between uses
                storage[place] = rows[self.rank]
                p.data = storage[place]
            else:  # p.data and the part view one padded buffer, so AdamW's update shows in p.data
                self.padded[id(p)] = rows
                p.data = rows.reshape(-1)[:p.size].reshape(p.shape)
            part = type(p)(p.data if self.stage == 3 else rows[self.rank])
            part.shard = p.shard  # the same tensor-parallel description (replicated? tied?)
            self.parts[id(p)] = part

    def part_groups(self, groups):
        """Optimizer groups over the parts, from groups over the parameters (options kept)."""
        return [{**group, "params": [self.parts[id(p)] for p in group["params"]]} for group in groups]

    # ---- gradients -------------------------------------------------------------------------
    def start_step(self):
        self.firings = {}
        self.peak_full_gradients = self.peak_gathered_parameters = 0
        for unit in self.units:
            unit.final, unit.gradient = 0, None
        for p in self.parameters:
            p.grad = self.parts[id(p)].grad = None

    def _on_gradient_ready(self, p):
        firings = self.firings[id(p)] = self.firings.get(id(p), 0) + 1
        if firings > self.expected_firings[id(p)]:
            raise RuntimeError(f"{p.shard.full_name} got a gradient {firings} times in one step, expected "
                               f"{self.expected_firings[id(p)]}: call finish_gradient_sync() once per step")
        self._note_full_gradients()
        if firings == self.expected_firings[id(p)]:
            unit = self.unit_of[id(p)]
            unit.final += 1
            if unit.final == len(unit.parameters):
                self._reduce_scatter(unit)

    def _note_full_gradients(self):
        held = bytes_held(p.grad for p in self.parameters)  # until finish_gradient_sync, only full ones
        self.peak_full_gradients = max(self.peak_full_gradients, held)

    def _reduce_scatter(self, unit):
        """ḡ_d = (1/N) Σ_i g_i on this rank's parts; each full gradient is freed once packed."""
        rows = xp.zeros((self.count, unit.length), dtype=unit.parameters[0].dtype)
        for p, place in unit.slots():
            if p.grad is not None:
                rows[:, place] = self._rows(p, p.grad)
            p.grad = None
        unit.gradient = xp.empty(unit.length, dtype=rows.dtype)
        self.comm.reduce_scatter(rows.reshape(-1), unit.gradient)
        unit.gradient /= self.count
        for p, place in unit.slots():
            self.parts[id(p)].grad = unit.gradient[place]

    def finish_gradient_sync(self):
        """Reduce-scatter every unit not yet sent (all of them in stage 1); then p.grad = its part."""
        self._note_full_gradients()
        for unit in self.units:  # in unit order: every dp rank starts the same collectives in the same order
            if unit.gradient is None:
                self._reduce_scatter(unit)
        for p in self.parameters:
            p.grad = self.parts[id(p)].grad

    def finish_tensor_parallel_gradients(self, tp_comm):
        """Sequence parallelism's sum over the tp group, on the parts (the same positions on every tp rank)."""
        finish_tensor_parallel_gradients(self.part_list, tp_comm)
        for p in self.parameters:  # the sums come back as new arrays: copy them into the unit buffers
            part = self.parts[id(p)]
            if part.grad is not p.grad:
                p.grad[...] = part.grad
                part.grad = p.grad

    # ---- parameters ------------------------------------------------------------------------
    def _all_gather(self, unit, parts):
        """(N, S): row r holds rank r's parts of the unit's parameters."""
        rows = xp.empty((self.count, unit.length), dtype=parts[0].dtype)
        self.comm.allgather(xp.concatenate(parts), rows.reshape(-1))
        return rows

    def _full(self, p, rows, place):
        """The tensor-parallel-shaped array of ``p`` from gathered rows (a copy, padding cut)."""
        return rows[:, place].reshape(-1)[:self.numbers[id(p)]].reshape(self.shape[id(p)])

    def finish_step(self):
        """After the optimizer step: stages 1-2 all-gather the updated parts; then measure memory."""
        if self.stage < 3:
            for unit in self.units:
                rows = self._all_gather(unit, [self.parts[id(p)].data for p in unit.parameters])
                for p, place in unit.slots():
                    self.padded[id(p)][...] = rows[:, place]
        state = self.optimizer.state.values() if self.optimizer is not None else []
        self.report = {"parameters": bytes_held(p.data for p in self.parameters),
                       "gradients": bytes_held(p.grad for p in self.parameters),
                       "optimizer_states": bytes_held(a for slots in state for a in slots.values())}
        self.report["total"] = sum(self.report.values())
        self.report.update(peak_full_gradients=self.peak_full_gradients,
                           peak_gathered_parameters=self.peak_gathered_parameters)

    @contextmanager
    def gathered(self, units):
        """Stage 3: the units' parameters at full size inside the block, their parts again after it."""
        try:
            for done, unit in enumerate(units, start=1):
                rows = self._all_gather(unit, [self.parts[id(p)].data for p in unit.parameters])
                for p, place in unit.slots():
                    p.data = self._full(p, rows, place)
                held = bytes_held(p.data for gathered in units[:done] for p in gathered.parameters)
                self.peak_gathered_parameters = max(self.peak_gathered_parameters, held + rows.nbytes)
                del rows
            yield
        finally:
            for p in (p for unit in units for p in unit.parameters):
                p.data = self.parts[id(p)].data

    def memory_report(self):
        """Bytes this rank held after its last step, measured from the arrays (docs/zero.md).

        parameters, gradients (the averaged parts), optimizer_states (m and v), their total;
        peak_full_gradients: most bytes of full-size gradients held at once during the step
        (sampled at the end of backward and at every grad-ready hook); peak_gathered_parameters:
        stage 3, most bytes of gathered parameters plus the all-gather buffer held at once.
        """
        return dict(self.report)

    # ---- arrays shaped like the tensor-parallel shards (checkpoints); collective over dp ------
    def full_arrays(self, part_arrays):
        """{id(p): array shaped like p's tensor-parallel shard} from {id(p): this rank's part}."""
        out = {}
        for unit in self.units:
            rows = self._all_gather(unit, [part_arrays[id(p)] for p in unit.parameters])
            out.update((id(p), self._full(p, rows, place)) for p, place in unit.slots())
        return out

    def parameter_arrays(self):
        if self.stage < 3:
            return {id(p): p.data.copy() for p in self.parameters}
        return self.full_arrays({id(p): self.parts[id(p)].data for p in self.parameters})

    def load_parameter(self, p, array):
        if self.stage < 3:
            p.data[...] = array
        else:
            self.parts[id(p)].data[...] = self._rows(p, array)[self.rank]

    def optimizer_state_arrays(self, optimizer):
        """{id(p): {"m": array, "v": array}} (zeros before a first step)."""
        moments = {}
        for slot in ("m", "v"):
            parts = {id(p): optimizer.state.get(id(part), {}).get(slot, xp.zeros_like(part.data))
                     for p, part in zip(self.parameters, self.part_list)}
            moments[slot] = self.full_arrays(parts)
        return {id(p): {slot: moments[slot][id(p)] for slot in moments} for p in self.parameters}

    def load_optimizer_state(self, optimizer, p, m, v):
        """AdamW's moments of p's part, from arrays shaped like p's tensor-parallel shard."""
        optimizer.state[id(self.parts[id(p)])] = {"m": self._rows(p, m)[self.rank].copy(),
                                                  "v": self._rows(p, v)[self.rank].copy()}


class GatheredPiece(Module):
    """Stage 3: ``piece`` run with its parameters gathered only for its forward and its backward."""

    def __init__(self, piece, zero, units):
        self.piece, self.zero, self.units = piece, zero, units

    def forward(self, x, *targets):
        parameters = [p for unit in self.units for p in unit.parameters]
        return _GatherRunRelease.apply(x, *parameters, wrapper=self, targets=targets,
                                       as_tensor=isinstance(x, Tensor),
                                       input_gradient=isinstance(x, Tensor) and x.requires_grad)


class _GatherRunRelease(Function):
    """Forward: gather, run the piece without a graph, release. Backward: gather, rerun it with
    its graph, backpropagate the output gradient through it, release (module docstring)."""

    @staticmethod
    def forward(ctx, x, *parameter_arrays, wrapper, targets, as_tensor, input_gradient):
        ctx.x, ctx.wrapper, ctx.targets, ctx.as_tensor = x, wrapper, targets, as_tensor
        ctx.input_gradient, ctx.parameter_count = input_gradient, len(parameter_arrays)
        ctx.random_states = [g.bit_generator.state for g in wrapper.piece.random_generators()]
        with wrapper.zero.gathered(wrapper.units), no_grad():
            return wrapper.piece(Tensor(x) if as_tensor else x, *targets).data

    @staticmethod
    def backward(ctx, grad):
        if not is_grad_enabled():
            raise RuntimeError("ZeRO stage 3 reruns each piece's forward in backward: run backward with gradients on")
        wrapper = ctx.wrapper
        x = Tensor(ctx.x, requires_grad=ctx.input_gradient) if ctx.as_tensor else ctx.x
        generators = wrapper.piece.random_generators()
        current = [g.bit_generator.state for g in generators]
        for generator, state in zip(generators, ctx.random_states):  # the forward's dropout masks again
            generator.bit_generator.state = state
        with wrapper.zero.gathered(wrapper.units):
            wrapper.piece(x, *ctx.targets).backward(grad)  # the grad-ready hooks reduce-scatter in here
        for generator, state in zip(generators, current):
            generator.bit_generator.state = state
        return (x.grad if ctx.input_gradient else None,) + (None,) * ctx.parameter_count
