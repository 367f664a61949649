"""ZeRO stage 3's gathering (parallel/zero.py): a piece's parameters whole only around its use.

Rajbhandari et al. 2020, section 5.3 (P_p). Between uses each parameter is a stand-in and only
this rank's part is kept. ``run_gathered`` runs a piece with its units all-gathered for its forward
(under no_grad, so no op keeps a full weight in its context) and again for its backward, which
reruns the forward with the graph (parallel/recompute.py replays its dropout masks) and
backpropagates through it; the parameters go back to their stand-ins right after each. With
``--overlap`` the all-gather of the piece that runs next is started (MPI_Iallgather) before this
piece computes: the following piece in forward, the previous one in backward (``order_of_pieces``).
"""
from contextlib import contextmanager

from minipar.backend import xp
from minipar.parallel.gradient_sync import bytes_held
from minipar.parallel.recompute import random_states, replaying
from minipar.tensor import Function, Tensor, is_grad_enabled, no_grad


def order_of_pieces(chunks):
    """{(id(piece), "forward"|"backward"): the piece of its chunk that runs after it in that pass}."""
    runs_next = {}
    for chunk in chunks:
        for before, after in zip(chunk.pieces[:-1], chunk.pieces[1:], strict=True):
            runs_next[id(before), "forward"], runs_next[id(after), "backward"] = after, before
    return runs_next


class GatheredPieces:
    """Stage 3's gather, run and release, as methods of ``Zero`` (its units, parts, stand-ins and
    dp communicator; ``prefetched`` and ``runs_next`` for --overlap)."""

    @contextmanager
    def gathered(self, units, prefetch=()):
        """Stage 3: the units' parameters whole inside the block, stand-ins again after it; with
        --overlap the all-gathers of ``prefetch`` (the next piece's units) start before the block."""
        try:
            for done, unit in enumerate(units, start=1):
                if id(unit) in self.prefetched:  # started while the previous piece computed
                    request, _, rows = self.prefetched.pop(id(unit))
                    request.wait()
                else:
                    rows = self._all_gather(unit, [self.parts[id(p)].data for p in unit.parameters])
                for p, place in unit.slots():
                    p.data = self._full(p, rows, place)
                held = bytes_held(p.data for gathered in units[:done] for p in gathered.parameters)
                self.peak_gathered_parameters = max(self.peak_gathered_parameters, held + rows.nbytes)
                del rows
            for unit in prefetch:
                if unit not in units and id(unit) not in self.prefetched:
                    send = xp.concatenate([self.parts[id(p)].data for p in unit.parameters])
                    rows = xp.empty((self.count, unit.length), dtype=send.dtype)
                    self.prefetched[id(unit)] = self.comm.iallgather(send, rows.reshape(-1)), send, rows
            if self.prefetched:
                held = bytes_held(p.data for gathered in units for p in gathered.parameters)
                in_flight = sum(rows.nbytes for _, _, rows in self.prefetched.values())
                self.peak_gathered_parameters = max(self.peak_gathered_parameters, held + in_flight)
            yield
        finally:
            for p in (p for unit in units for p in unit.parameters):
                p.data = self.stand_in[id(p)]

    def prefetch_after(self, piece, direction):
        """The units to all-gather ahead while ``piece`` runs its ``direction`` pass (--overlap)."""
        following = self.runs_next.get((id(piece), direction))
        return self.units_of_piece[id(following)] if following is not None else ()

    def run_gathered(self, piece, x, *targets):
        """Stage 3: ``piece(x, *targets)`` with its parameters gathered for its forward and its backward only."""
        units = self.units_of_piece[id(piece)]
        parameters = [p for unit in units for p in unit.parameters]
        # The parameters are inputs only so that the output needs a gradient when x is token ids.
        return _GatherRunRelease.apply(x, *parameters, zero=self, piece=piece, units=units, targets=targets,
                                       as_tensor=isinstance(x, Tensor),
                                       input_gradient=isinstance(x, Tensor) and x.requires_grad)



class _GatherRunRelease(Function):
    """Forward: gather, run the piece without a graph, release. Backward: gather, rerun it with
    its graph, backpropagate the output gradient through it, release (module docstring)."""
    rounds_output = False  # 16-bit compute: its output is the piece's, which the piece's own ops rounded

    @staticmethod
    def forward(ctx, x, *parameter_arrays, zero, piece, units, targets, as_tensor, input_gradient):
        ctx.x, ctx.zero, ctx.piece, ctx.units, ctx.targets = x, zero, piece, units, targets
        ctx.as_tensor, ctx.input_gradient, ctx.parameter_count = as_tensor, input_gradient, len(parameter_arrays)
        ctx.random_states = random_states(piece)
        with zero.gathered(units, zero.prefetch_after(piece, "forward")), no_grad():
            return piece(Tensor(x) if as_tensor else x, *targets).data

    @staticmethod
    def backward(ctx, grad):
        if not is_grad_enabled():
            raise RuntimeError("ZeRO stage 3 reruns each piece's forward in backward: run backward with gradients on")
        x = Tensor(ctx.x, requires_grad=ctx.input_gradient) if ctx.as_tensor else ctx.x
        prefetch = ctx.zero.prefetch_after(ctx.piece, "backward")
        with replaying(ctx.piece, ctx.random_states), ctx.zero.gathered(ctx.units, prefetch):
            ctx.piece(x, *ctx.targets).backward(grad)  # the grad-ready hooks reduce-scatter in here
        return (x.grad if ctx.input_gradient else None,) + (None,) * ctx.parameter_count
