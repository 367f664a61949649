"""The autograd engine: a Tensor that remembers how it was made, and reverse-mode backward.

Every differentiable operation is a ``Function`` with two halves written side by side:

    class Exp(Function):
        @staticmethod
        def forward(ctx, x):            # arrays in, array out
            out = xp.exp(x)
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, grad):        # dL/d(out) in, dL/d(input) out
            (out,) = ctx.saved
            return grad * out

``Exp.apply(t)`` runs ``forward`` on the arrays inside the tensors and, when a gradient
is wanted, records a node of the graph. ``loss.backward()`` then visits the graph in
reverse topological order and applies the chain rule,

    dL/dx = sum over the uses y of x of  (dL/dy) (dy/dx),

each ``backward`` computing one vector-Jacobian product. The node of a tensor is the
``Context`` its op filled in, plus the op and its inputs: one object per op, nothing more.

Order. A tensor's gradient is complete once every op that used it has passed its share back.
So backward first counts, for each tensor below the root, its uses by ops reachable from the
root (only those: a graph may hang off tensors that this loss never touched), then runs an op
as soon as its output's count reaches zero (Kahn's algorithm: a topological order, found
without sorting). A leaf whose count reaches zero is final at that moment, so its
gradient-ready hooks fire right after the last op that used it: in a network, the last layer's
parameters are ready first, which is what lets data parallelism overlap its allreduces with the
rest of backward. Both passes use an explicit stack, so a graph thousands of ops deep never
meets Python's recursion limit.

Splitting backward in two (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"). A pipeline stage's
backward does two jobs: B, the gradient of its input, which the previous stage is waiting for, and
W, the gradient of its weights, which nobody needs until the optimizer step. For y = x W,

    B:  dL/dx = dL/dy W^T          W:  dL/dW = x^T dL/dy

``backward(grad, defer_weights=True, inputs=(x,))`` runs B only and returns a
``WeightGradients``: every op runs its backward for the tensors that are not leaves (and for the
leaves in ``inputs``), and an op that declares ``defers_weight_gradient`` leaves the gradients of
its leaf inputs (its weights) for later, keeping what it saved and the incoming gradient. Calling
``.run()`` on the result is W: it replays that work, and the additions into each leaf, in exactly
the order a plain backward would have done them, so the sums come out bit for bit the same. A
leaf's gradient-ready hooks fire in W, when it is final. Ops that do not declare the split
compute their leaves' gradients in B; W then only adds them in.

Communication sits on the autograd path the same way: an op whose forward is the identity
and whose backward is an allreduce is just another ``Function`` (see parallel/).
"""
from contextlib import contextmanager
from itertools import zip_longest

from minipar.backend import default_dtype, xp

_grad_enabled = True
_saved_observers = []  # opt-in: see observe_saved
_round = None  # 16-bit compute: rounds op outputs and gradients to the format (see rounding_to)


@contextmanager
def rounding_to(round_to_format):
    """Emulate 16-bit compute in the block: every op's output, every gradient an op passes back and
    every sum of gradients is ``round_to_format(array)`` (minipar/mixed_precision.py). An op computes
    in fp32 from 16-bit inputs and rounds once, as a GPU kernel does; ops with ``rounds_output = False``
    (the loss: an fp32 island) keep their fp32 result."""
    global _round
    previous, _round = _round, round_to_format
    try:
        yield
    finally:
        _round = previous


@contextmanager
def observe_saved(observer):
    """Call ``observer(arrays)`` at every ``save_for_backward`` in the block (to count activation memory)."""
    _saved_observers.append(observer)
    try:
        yield
    finally:
        _saved_observers.remove(observer)


@contextmanager
def no_grad():
    """Run a block without recording a graph (evaluation, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


class Context:
    """What ``forward`` leaves for ``backward``: saved arrays plus any attributes it sets.

    When the op is recorded, its Context is also the graph node: ``apply`` adds the op
    (``function``) and its ``inputs``, so backward finds everything in one object.
    """

    saved = ()
    skipped_inputs = frozenset()  # indices whose gradient this backward call must not compute (B/W split)

    def save_for_backward(self, *arrays):
        self.saved = arrays
        for observer in _saved_observers:
            observer(arrays)

    def needs_input_grad(self, index):
        """Whether backward must return a gradient for input ``index``; an op may skip the work if not."""
        x = self.inputs[index]
        return isinstance(x, Tensor) and x.requires_grad and index not in self.skipped_inputs


class Function:
    """A differentiable op: subclass it and write ``forward`` and ``backward``.

    ``defers_weight_gradient = True`` says that ``backward`` computes only the gradients that
    ``ctx.needs_input_grad`` asks for, so the engine can call it twice: once for the inputs (B),
    once, later, for the leaf weights (W). See ``Tensor.backward(defer_weights=True)``.
    """

    defers_weight_gradient = False
    rounds_output = True  # under rounding_to: False for fp32 islands (the loss) and exact ops (views)

    @staticmethod
    def forward(ctx, *inputs, **options):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        """Return one gradient per positional input of forward (``None`` where none is needed)."""
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **options):
        arrays, wants_grad = [], False
        for x in inputs:
            if isinstance(x, Tensor):
                arrays.append(x.data)
                wants_grad = wants_grad or x.requires_grad
            else:
                arrays.append(x)
        ctx = Context()
        out = cls.forward(ctx, *arrays, **options)
        out = Tensor(_rounded(out) if cls.rounds_output else out)
        if wants_grad and _grad_enabled:
            ctx.function, ctx.inputs = cls, inputs
            out.requires_grad, out._node = True, ctx
        return out


class Tensor:
    """An array (``.data``) plus what autograd needs: ``.grad``, ``requires_grad`` and its maker."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "_grad_ready_hooks", "name")
    __array_priority__ = 1000  # so that array + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is not None:
            data = xp.asarray(data, dtype=dtype)
        elif not hasattr(data, "dtype"):  # Python numbers and lists get the default float dtype
            data = xp.asarray(data)
            if data.dtype.kind == "f":
                data = data.astype(default_dtype())
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._node = None  # the Context of the op that made this tensor (None for a leaf)
        self._grad_ready_hooks = None
        self.name = None

    # ---- basic facts -------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    def item(self):
        return self.data.item()

    def numpy(self):
        from minipar.backend import to_host

        return to_host(self.data)

    def detach(self):
        return Tensor(self.data)

    def zero_grad(self):
        self.grad = None

    def register_grad_ready_hook(self, hook):
        """Call ``hook(self)`` during backward as soon as this leaf's gradient is final.

        Data parallelism uses it to start an allreduce while backward is still running.
        """
        if self._grad_ready_hooks is None:
            self._grad_ready_hooks = []
        self._grad_ready_hooks.append(hook)

    # ---- reverse mode ------------------------------------------------------------------
    def backward(self, grad=None, defer_weights=False, inputs=()):
        """Accumulate d(self)/d(leaf), times ``grad``, into ``.grad`` of every leaf below.

        ``grad`` defaults to 1 for a scalar. Gradients add up across calls until
        ``zero_grad`` (that is what gradient accumulation over micro-batches relies on).

        ``defer_weights=True`` runs only B: the leaves in ``inputs`` get their gradient now, every
        other leaf (the weights) waits for ``.run()`` of the returned ``WeightGradients`` (W).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require a gradient")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() needs a gradient for a non-scalar of shape {self.shape}")
            grad = xp.ones_like(self.data)
        elif isinstance(grad, Tensor):
            grad = grad.data
        if grad.shape != self.shape:
            from minipar.errors import ShapeError

            raise ShapeError(f"backward: gradient of shape {grad.shape} for a tensor of shape {self.shape}")
        later = WeightGradients({id(x) for x in inputs}) if defer_weights else None
        finish_leaf = _accumulate_leaf if later is None else later.finish_leaf

        uses = _count_uses(self)
        pending = {id(self): grad}  # tensor -> gradient summed over the uses run so far
        ready = [self]  # tensors whose gradient is complete and whose op has not run yet
        while ready:
            tensor = ready.pop()
            grad = pending.pop(id(tensor), None)
            ctx = tensor._node
            if ctx is None:  # a leaf
                finish_leaf(tensor, grad)
                continue
            if ctx is _FREED:
                if grad is None:  # nothing would flow through it, so it does not matter that it is gone
                    continue
                raise RuntimeError("backward through a graph whose saved arrays were already freed by an "
                                   "earlier backward; run the forward again")
            input_grads = () if grad is None else _input_gradients(ctx, grad, later)
            for x, g in zip_longest(ctx.inputs, input_grads):  # g is None: no gradient flows to x
                if not isinstance(x, Tensor) or not x.requires_grad:
                    continue
                key = id(x)
                if g is not None:
                    if later is not None and later.defers(x):
                        later.add(x, g)  # summed in W, in this order
                    else:
                        pending[key] = g if key not in pending else _rounded(pending[key] + g)
                uses[key] -= 1
                if uses[key] == 0:  # every use of x has passed its gradient back
                    if x._node is None:
                        finish_leaf(x, pending.pop(key, None))  # now, so its hooks fire early
                    else:
                        ready.append(x)
            if grad is not None:
                tensor._node = _FREED  # drop the saved activations as soon as they are used
        return later

    # ---- operators (the ops themselves live in minipar/ops) -----------------------------
    def __add__(self, other):
        return ops.add(self, other)

    def __radd__(self, other):
        return ops.add(other, self)

    def __sub__(self, other):
        return ops.sub(self, other)

    def __rsub__(self, other):
        return ops.sub(other, self)

    def __mul__(self, other):
        return ops.mul(self, other)

    def __rmul__(self, other):
        return ops.mul(other, self)

    def __truediv__(self, other):
        return ops.div(self, other)

    def __rtruediv__(self, other):
        return ops.div(other, self)

    def __neg__(self):
        return ops.neg(self)

    def __pow__(self, exponent):
        return ops.power(self, exponent)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __getitem__(self, index):
        return ops.getitem(self, index)

    def sum(self, axis=None, keepdims=False):
        return ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return ops.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return ops.max(self, axis, keepdims)

    def reshape(self, *shape):
        return ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def transpose(self, *axes):
        return ops.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes or None)

    def exp(self):
        return ops.exp(self)

    def log(self):
        return ops.log(self)

    def tanh(self):
        return ops.tanh(self)

    def relu(self):
        return ops.relu(self)


_FREED = Context()  # marks a node whose backward already ran


def _input_gradients(ctx, grad, later):
    """One op's backward as a tuple of input gradients; under a B/W split, B's share only.

    An op that declares ``defers_weight_gradient`` skips its deferred leaves now and is queued
    (with its saved arrays and ``grad``) for W; any other op computes every gradient now.
    """
    deferred = () if later is None or not ctx.function.defers_weight_gradient else \
        [i for i, x in enumerate(ctx.inputs) if isinstance(x, Tensor) and x.requires_grad and later.defers(x)]
    if deferred:
        ctx.skipped_inputs = frozenset(deferred)  # B: every gradient but the deferred leaves'
        input_grads = ctx.function.backward(ctx, grad)
        ctx.skipped_inputs = frozenset(i for i in range(len(ctx.inputs)) if i not in deferred)  # W: only those
        later.queue_op(ctx, grad)
    else:
        input_grads = ctx.function.backward(ctx, grad)
    if not isinstance(input_grads, tuple):
        input_grads = (input_grads,)
    if _round is not None:
        input_grads = tuple(_rounded(g) for g in input_grads)
    if deferred:  # B must not have computed them; W will
        input_grads = tuple(None if i in deferred else g for i, g in enumerate(input_grads))
    return input_grads


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

    def queue_op(self, ctx, grad):
        self._queue.append(("op", ctx, grad))

    def add(self, leaf, grad):
        self._queue.append(("add", leaf, grad))

    def finish_leaf(self, leaf, grad):
        if id(leaf) in self._now:
            _accumulate_leaf(leaf, grad)
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
                        key, g = id(x), _rounded(g)  # 16-bit compute: as B rounds its gradients
                        pending[key] = g if key not in pending else _rounded(pending[key] + g)
            elif what == "add":
                key = id(subject)
                pending[key] = grad if key not in pending else _rounded(pending[key] + grad)
            else:
                _accumulate_leaf(subject, pending.pop(id(subject), None))
        self._queue.clear()  # drops the saved activations W was keeping
        self.done = True


def _count_uses(root):
    """For every tensor below ``root``: how many ops reachable from ``root`` take it as an input.

    Ops that only a different graph reaches do not count, so the gradient of a parameter that
    another micro-batch's graph also uses is complete when this graph is done with it.
    """
    uses, stack = {}, [root]
    while stack:
        ctx = stack.pop()._node
        if ctx is None or ctx is _FREED:
            continue
        for x in ctx.inputs:
            if isinstance(x, Tensor) and x.requires_grad:
                key = id(x)
                if key in uses:
                    uses[key] += 1
                else:  # first sight: walk below it once
                    uses[key] = 1
                    stack.append(x)
    return uses


def _rounded(array):
    """``array`` in the 16-bit format of ``rounding_to`` (floating arrays only), or as it is."""
    if _round is None or array is None or getattr(array, "dtype", None) is None or array.dtype.kind != "f":
        return array
    return _round(array)


def _accumulate_leaf(leaf, grad):
    """Add a finished gradient into ``leaf.grad`` and tell whoever waits for it.

    The first contribution is copied, because the incoming array may be shared with another
    input's gradient; later ones (micro-batches, a weight used twice) are added into that copy
    in place, as PyTorch does, instead of allocating a new sum each time. So code that sets
    ``.grad`` itself must give it an array of its own.
    """
    if grad is None:  # no op on the way passed a gradient back: nothing to add or announce
        return
    if leaf.grad is None:
        leaf.grad = grad.astype(leaf.data.dtype, copy=True)
    else:
        leaf.grad += grad
        if _round is not None:  # a 16-bit gradient stays 16-bit as micro-batches add up
            leaf.grad[...] = _round(leaf.grad)
    for hook in leaf._grad_ready_hooks or ():
        hook(leaf)


from minipar import ops  # noqa: E402  (ops import Tensor, so they load after it)
