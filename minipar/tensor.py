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

each ``backward`` computing one vector-Jacobian product. The graph is sorted with an
explicit stack, so a graph thousands of ops deep never meets Python's recursion limit.

Communication sits on the autograd path the same way: an op whose forward is the identity
and whose backward is an allreduce is just another ``Function`` (see parallel/).
"""
from contextlib import contextmanager

from minipar.backend import default_dtype, xp

_grad_enabled = True
_saved_observers = []  # opt-in: see observe_saved


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
    """What ``forward`` leaves for ``backward``: saved arrays plus any attributes it sets."""

    saved = ()

    def save_for_backward(self, *arrays):
        self.saved = arrays
        for observer in _saved_observers:
            observer(arrays)


class Function:
    """A differentiable op: subclass it and write ``forward`` and ``backward``."""

    @staticmethod
    def forward(ctx, *inputs, **options):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        """Return one gradient per positional input of forward (``None`` where none is needed)."""
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **options):
        arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
        ctx = Context()
        out = Tensor(cls.forward(ctx, *arrays, **options))
        if _grad_enabled and any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
            out.requires_grad = True
            out._node = (cls, ctx, inputs)
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
        self._node = None  # (Function class, Context, inputs) for tensors made by an op
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
    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf), times ``grad``, into ``.grad`` of every leaf below.

        ``grad`` defaults to 1 for a scalar. Gradients add up across calls until
        ``zero_grad`` (that is what gradient accumulation over micro-batches relies on).
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

        pending = {id(self): grad}  # node -> gradient summed over the uses seen so far
        for node in reversed(_topological_order(self)):
            grad = pending.pop(id(node), None)
            if grad is None:
                continue
            if node._node is _FREED:
                raise RuntimeError("backward through a graph whose saved arrays were already freed by an "
                                   "earlier backward; run the forward again")
            if node._node is None:  # a leaf: its gradient is complete now
                # A fresh array: the incoming one may be shared with another input's gradient.
                node.grad = grad.astype(node.data.dtype, copy=True) if node.grad is None else node.grad + grad
                for hook in node._grad_ready_hooks or ():
                    hook(node)
                continue
            function, ctx, inputs = node._node
            input_grads = function.backward(ctx, grad)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for x, g in zip(inputs, input_grads):
                if g is None or not isinstance(x, Tensor) or not x.requires_grad:
                    continue
                key = id(x)
                pending[key] = g if key not in pending else pending[key] + g
            node._node = _FREED  # drop the saved activations as soon as they are used

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


_FREED = ("freed",)  # marks a node whose backward already ran


def _topological_order(root):
    """Nodes reachable from ``root`` that need a gradient, every node after all its inputs.

    Iterative depth-first search: each stack entry is (tensor, inputs already pushed?).
    Leaf inputs are pushed before the others so that, in the reversed order backward walks,
    a parameter comes right after the op that last uses it: its gradient-ready hook then
    fires early in backward, which is what lets data parallelism overlap communication.
    """
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        tensor, inputs_done = stack.pop()
        if inputs_done:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        if tensor._node is not None and tensor._node is not _FREED:
            inputs = [x for x in tensor._node[2] if isinstance(x, Tensor) and x.requires_grad]
            for x in sorted(inputs, key=lambda x: x._node is not None):  # leaves first
                if id(x) not in visited:
                    stack.append((x, False))
    return order


from minipar import ops  # noqa: E402  (ops import Tensor, so they load after it)
