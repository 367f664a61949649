"""Backward split in two, B and W, for the zero-bubble pipelines (Qi et al. 2023, "Zero Bubble
Pipeline Parallelism").

A pipeline stage's backward does two jobs: B, the gradient of its input, which the previous stage
is waiting for, and W, the gradient of its weights, which nobody needs until the optimizer step.
For $y = x W$, B computes $∂L/∂x = (∂L/∂y) Wᵀ$ and W computes $∂L/∂W = xᵀ (∂L/∂y)$.

``Tensor.backward(grad, defer_weights=True, inputs=(x,))`` runs B only and returns a
``WeightGradients``: every op runs its backward for the tensors that are not leaves (and for the
leaves in ``inputs``), and an op that declares ``defers_weight_gradient`` leaves the gradients of
its leaf inputs (its weights) for later, keeping what it saved and the incoming gradient. Calling
``.run()`` on the result is W: it replays that work, and the additions into each leaf, in exactly
the order a plain backward would have done them, so the sums come out bit for bit the same. A
leaf's gradient-ready hooks fire in W, when it is final. Ops that do not declare the split
compute their leaves' gradients in B; W then only adds them in.

The engine (minipar/tensor.py) calls three methods while it walks the graph: ``input_gradients``
for each op's backward, ``add`` for each gradient that reaches a deferred leaf, ``finish_leaf``
when a leaf has no use left in the graph.
"""
from minipar.grad_mode import rounded
from minipar.tensor import Tensor, accumulate_leaf


class WeightGradients:
    """W of one backward: the weight-gradient work B left behind, replayed in order by ``run``.

    The queue holds three kinds of entry, in the order a plain backward would have met them:
    an op whose backward still owes its leaves' gradients, a gradient already computed for a
    leaf (by an op that cannot split), and "this leaf is complete". ``run`` sums each leaf's
    contributions in that order, as the plain engine does, then adds the sum into ``.grad`` and
    fires the leaf's hooks: the result is identical to ``backward`` without the split.
    """

    def __init__(self, now_ids):
        self._now = now_ids  # ids of the leaves whose gradient B computes itself (a stage's input)
        self._queue = []
        self.done = False

    def defers(self, tensor):
        return tensor._node is None and id(tensor) not in self._now

    def input_gradients(self, ctx, grad):
        """B's share of one op's backward, as a tuple of input gradients (None for the deferred).

        An op that declares ``defers_weight_gradient`` skips its deferred leaves now and is
        queued (with its saved arrays and ``grad``) for W; any other op computes every gradient now.
        """
        deferred = () if not ctx.function.defers_weight_gradient else \
            [i for i, x in enumerate(ctx.inputs) if isinstance(x, Tensor) and x.requires_grad and self.defers(x)]
        if not deferred:
            return ctx.function.backward(ctx, grad)
        ctx.skipped_inputs = frozenset(deferred)  # B: every gradient but the deferred leaves'
        input_grads = ctx.function.backward(ctx, grad)
        ctx.skipped_inputs = frozenset(i for i in range(len(ctx.inputs)) if i not in deferred)  # W: only those
        self._queue.append(("op", ctx, grad))
        input_grads = input_grads if isinstance(input_grads, tuple) else (input_grads,)
        return tuple(None if i in deferred else g for i, g in enumerate(input_grads))  # W computes those

    def add(self, leaf, grad):
        self._queue.append(("add", leaf, grad))

    def finish_leaf(self, leaf, grad):
        if id(leaf) in self._now:
            accumulate_leaf(leaf, grad)
            return
        if grad is not None:
            self._queue.append(("add", leaf, grad))
        self._queue.append(("finish", leaf, None))

    def __len__(self):
        return len(self._queue)

    def run(self):
        """W: every deferred weight gradient, summed and accumulated as a plain backward would."""
        if self.done:
            raise RuntimeError("WeightGradients.run() called twice: the weight gradients were already added")
        pending = {}
        for what, subject, grad in self._queue:
            if what == "op":
                grads = subject.function.backward(subject, grad)
                grads = grads if isinstance(grads, tuple) else (grads,)
                for index, (x, g) in enumerate(zip(subject.inputs, grads)):
                    if g is not None and index not in subject.skipped_inputs:
                        key, g = id(x), rounded(g)  # 16-bit compute: as B rounds its gradients
                        pending[key] = g if key not in pending else rounded(pending[key] + g)
            elif what == "add":
                key = id(subject)
                pending[key] = grad if key not in pending else rounded(pending[key] + grad)
            else:
                accumulate_leaf(subject, pending.pop(id(subject), None))
        self._queue.clear()  # drops the saved activations W was keeping
        self.done = True
