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

Order. A tensor's gradient is complete once every op that used it has passed its share back, so
backward runs the ops in a topological order, outputs before inputs. One depth-first walk from the
root finds it: an op is listed once every op below it is, so the list read backwards is the order
(Tarjan 1976). Only ops reachable from the root count: a graph may hang off tensors that this loss
never touched. A leaf goes into the list when the first of its users is listed, which puts it, in
backward, right after the last op that uses it: its gradient is final there, and its
gradient-ready hooks fire at once. In a network the last layer's parameters are ready first, which
is what lets data parallelism overlap its allreduces with the rest of backward. The walk uses an
explicit stack, so a graph thousands of ops deep never meets Python's recursion limit.

Splitting backward in two (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"):
``backward(grad, defer_weights=True, inputs=(x,))`` computes the gradient of the stage's input now
(B) and returns a ``WeightGradients`` whose ``.run()`` computes the weights' later (W); see
minipar/weight_gradients.py.

Communication sits on the autograd path as ops too: one whose forward is the identity and whose
backward is an allreduce is just another ``Function`` (see parallel/). ``no_grad`` and
``observe_saved`` switch and watch the recording (minipar/grad_mode.py).
"""
from minipar import grad_mode
from minipar.backend import default_dtype, xp
from minipar.grad_mode import is_grad_enabled, no_grad, observe_saved, rounded, rounding_to  # noqa: F401  (imported from here)


class Context:
    """What ``forward`` leaves for ``backward``: saved arrays plus any attributes it sets.

    When the op is recorded, its Context is also the graph node: ``apply`` adds the op
    (``function``) and its ``inputs``, so backward finds everything in one object.
    """

    saved = ()
    inputs = ()  # set by apply when the op is recorded
    skipped_inputs = frozenset()  # indices whose gradient this backward call must not compute (B/W split)

    def save_for_backward(self, *arrays):
        self.saved = arrays
        for observer in grad_mode.saved_observers:
            observer(arrays)

    def needs_input_grad(self, index):
        """Whether backward must return a gradient for input ``index``; an op may skip the work if not."""
        x = self.inputs[index]
        return isinstance(x, Tensor) and x.requires_grad and index not in self.skipped_inputs


class Function:
    """A differentiable op: subclass it and write ``forward`` and ``backward``.

    ``defers_weight_gradient = True`` says that ``backward`` computes only the gradients that
    ``ctx.needs_input_grad`` asks for, so the engine can call it twice: once for the inputs (B),
    once, later, for the leaf weights (W). See minipar/weight_gradients.py.
    """

    defers_weight_gradient = False
    rounds_output = True  # under grad_mode.rounding_to: False for fp32 islands (the loss) and exact ops

    @staticmethod
    def forward(ctx, *inputs, **options):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        """Return one gradient per positional input of forward (``None`` where none is needed)."""
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **options):
        ctx, arrays, record = Context(), [], False
        for x in inputs:
            if isinstance(x, Tensor):
                arrays.append(x.data)
                record = record or x.requires_grad
            else:
                arrays.append(x)
        out = cls.forward(ctx, *arrays, **options)
        if grad_mode.round_to_format is not None and cls.rounds_output:  # 16-bit compute: grad_mode.rounding_to
            out = rounded(out)
        out = Tensor(out)
        if record and grad_mode.recording:  # record the node
            ctx.function, ctx.inputs = cls, inputs
            out.requires_grad, out._node = True, ctx
        return out


class Tensor:
    """An array (``.data``) plus what autograd needs: ``.grad``, ``requires_grad`` and its maker.

    A Tensor compares and hashes by identity (it defines no ``__eq__``): backward keys its sets and
    dicts by the tensors themselves."""

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
        later = None
        if defer_weights:
            from minipar.weight_gradients import WeightGradients  # it builds on this module

            later = WeightGradients({id(x) for x in inputs})
        finish_leaf = accumulate_leaf if later is None else later.finish_leaf

        pending = {self: grad}  # tensor -> gradient summed over the uses run so far (keyed by identity)
        order = _topological_order(self)
        while order:  # from the end: every op after all the ops that use its output
            tensor = order.pop()  # and let go of it, so its array is freed once nothing else holds it
            grad = pending.pop(tensor, None)
            ctx = tensor._node
            if ctx is None:  # a leaf, after the last op that uses it
                finish_leaf(tensor, grad)
                continue
            if grad is None:  # nothing flows through this op (it does not matter if it was freed)
                continue
            if ctx is _FREED:
                raise RuntimeError("backward through a graph whose saved arrays were already freed by an "
                                   "earlier backward; run the forward again")
            input_grads = ctx.function.backward(ctx, grad) if later is None else later.input_gradients(ctx, grad)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            if grad_mode.round_to_format is not None:
                input_grads = tuple(rounded(g) for g in input_grads)
            for x, g in zip(ctx.inputs, input_grads):  # a missing or None g: no gradient flows to x
                if g is None or not isinstance(x, Tensor) or not x.requires_grad:
                    continue
                if later is not None and later.defers(x):
                    later.add(x, g)  # summed in W, in this order
                else:
                    pending[x] = g if x not in pending else rounded(pending[x] + g)
            tensor._node = _FREED  # drop the saved activations as soon as they are used
        return later

    # ---- operators: a table, one line each (the ops themselves live in minipar/ops) ----------
    def __add__(self, other): return ops.add(self, other)
    def __radd__(self, other): return ops.add(other, self)
    def __sub__(self, other): return ops.sub(self, other)
    def __rsub__(self, other): return ops.sub(other, self)
    def __mul__(self, other): return ops.mul(self, other)
    def __rmul__(self, other): return ops.mul(other, self)
    def __truediv__(self, other): return ops.div(self, other)
    def __rtruediv__(self, other): return ops.div(other, self)
    def __neg__(self): return ops.neg(self)
    def __pow__(self, exponent): return ops.power(self, exponent)
    def __matmul__(self, other): return ops.matmul(self, other)
    def __getitem__(self, index): return ops.getitem(self, index)
    def sum(self, axis=None, keepdims=False): return ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return ops.max(self, axis, keepdims)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def tanh(self): return ops.tanh(self)
    def relu(self): return ops.relu(self)

    def reshape(self, *shape):  # x.reshape(2, 3) or x.reshape((2, 3))
        return ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def transpose(self, *axes):
        return ops.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes or None)


_FREED = Context()  # marks a node whose backward already ran (it has no inputs)


def _topological_order(root):
    """The tensors that ``root`` depends on, each listed after every tensor it depends on.

    A depth-first walk: an op is listed when the walk comes back up to it, after everything
    below it (the ``None`` pushed above an op on the stack marks that moment). A leaf is listed
    just before the first of its users to be listed, so that, read backwards, it comes right
    after the last op that uses it. A freed op is listed without its inputs (it has none left).
    """
    if root._node is None:
        return [root]
    order, seen, stack = [], set(), [root]
    while stack:
        tensor = stack.pop()
        if tensor is None:  # everything below the op under this mark is listed: list the op
            tensor = stack.pop()
            for x in tensor._node.inputs:  # leaves no op listed so far uses: this op is their last user
                if isinstance(x, Tensor) and x._node is None and x.requires_grad and x not in seen:
                    seen.add(x)
                    order.append(x)
            order.append(tensor)
        elif tensor not in seen:
            seen.add(tensor)
            stack += (tensor, None)
            for x in tensor._node.inputs:
                if isinstance(x, Tensor) and x._node is not None and x not in seen:
                    stack.append(x)
    return order


def accumulate_leaf(leaf, grad):
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
        if grad_mode.round_to_format is not None:  # a 16-bit gradient stays 16-bit as micro-batches add up
            leaf.grad[...] = grad_mode.round_to_format(leaf.grad)
    for hook in leaf._grad_ready_hooks or ():
        hook(leaf)


from minipar import ops  # noqa: E402  (ops import Tensor, so they load after it)
