"""ZeRO's state (parallel/zero.py): the arrays checkpoints see and the memory a rank holds.

A checkpoint stores every parameter and AdamW moment shaped like its tensor-parallel shard, in
every mode, so one written under ``--zero 3`` loads under plain data parallelism and back. ZeRO
holds only this rank's part of each (1/N of the padded flat array, ``Zero._rows``), so reading
is an all-gather over dp per unit (collective: every dp rank calls it, in the same order) and
loading keeps this rank's row. Stages 1-2 keep the whole parameters as well, and read them
directly. ``memory_report`` measures the bytes behind the parts and the peaks the step noted.
"""
from minipar.backend import xp
from minipar.parallel.gradient_sync import MOMENTS, ReplicaState, memory_report


class ZeroState(ReplicaState):
    """The state half (``STATE_MEMBERS``) of ``zero``, a ``Zero``: its parts read and written as
    whole tensor-parallel shards, and its memory measured."""

    def __init__(self, zero):
        super().__init__(zero.parameters)
        self.zero = zero

    def memory_report(self, optimizer):
        """Bytes this rank holds after a step, measured from the arrays (docs/zero.md).

        parameters (the parts, with stages 1-2's whole padded buffers they view), gradients (the
        averaged parts), optimizer_states (m and v), their total; peak_full_gradients: most bytes
        of full-size gradients held at once during the step (sampled at the end of backward and at
        every grad-ready hook); peak_gathered_parameters: stage 3, most bytes of gathered
        parameters plus the all-gather buffer held at once.
        """
        parts = self.zero.part_list
        report = memory_report((part.data for part in parts), (part.grad for part in parts), optimizer)
        return {**report, "peak_full_gradients": self.zero.peak_full_gradients,
                "peak_gathered_parameters": self.zero.peak_gathered_parameters}

    # ---- arrays shaped like the tensor-parallel shards (checkpoints); collective over dp ------
    def _full_arrays(self, part_arrays):
        """{id(p): array shaped like p} from {id(p): this rank's part}."""
        out = {}
        for unit in self.zero.units:
            rows = self.zero._all_gather(unit, [part_arrays[id(p)] for p in unit.parameters])
            out.update((id(p), self.zero._full(p, rows, place)) for p, place in unit.slots())
        return out

    def parameter_arrays(self):
        if self.zero.stage < 3:
            return super().parameter_arrays()
        return self._full_arrays({id(p): self.zero.parts[id(p)].data for p in self.parameters})

    def gradient_arrays(self):
        return self._full_arrays({id(p): self.zero.parts[id(p)].grad for p in self.parameters})

    def load_parameter(self, parameter, array):
        if self.zero.stage < 3:
            parameter.data[...] = array
        else:
            self.zero.parts[id(parameter)].data[...] = self.zero._rows(parameter, array)[self.zero.rank]

    def optimizer_state_arrays(self, optimizer):
        moments = {}
        for slot in MOMENTS:
            parts = {id(p): optimizer.state.get(id(part), {}).get(slot, xp.zeros_like(part.data))
                     for p, part in zip(self.parameters, self.zero.part_list, strict=True)}
            moments[slot] = self._full_arrays(parts)
        return {id(p): {slot: moments[slot][id(p)] for slot in MOMENTS} for p in self.parameters}

    def load_optimizer_state(self, optimizer, parameter, moments):
        optimizer.state[id(self.zero.parts[id(parameter)])] = {
            slot: self.zero._rows(parameter, moments[slot])[self.zero.rank].copy() for slot in MOMENTS}
