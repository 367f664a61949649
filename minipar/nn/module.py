"""Module and Parameter: how layers hold their weights and find each other's."""
from minipar.backend import from_host, xp
from minipar.errors import CheckpointError
from minipar.tensor import Tensor


class Parameter(Tensor):
    """A Tensor the optimizer updates: a leaf that always requires a gradient.

    No ``__slots__``: code outside ``nn/`` may attach what it needs to know about a
    parameter as a plain attribute (the parallel side attaches ``shard``, see
    minipar.parallel.sharding); the model itself knows nothing of it.
    """

    def __init__(self, data):
        super().__init__(from_host(data), requires_grad=True)


class Module:
    """A layer or a model. Parameters, sub-modules and lists of sub-modules assigned as
    attributes are found by ``named_parameters`` in the order they were assigned, so every
    rank and every run walks the parameters in the same order."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, child in enumerate(value):
                    yield f"{name}.{i}", child

    def named_parameters(self, prefix=""):
        """(name, parameter) pairs; a parameter held twice (a tied weight) is listed once."""
        seen = set()
        for name, p in self._all_named_parameters(prefix):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _all_named_parameters(self, prefix):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.children():
            yield from child._all_named_parameters(prefix + name + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def random_generators(self):
        """Every random generator below this module (the Dropout layers'), in a fixed order.

        Recomputation saves their states before a forward and restores them before running it
        again, so the second forward draws the same dropout masks as the first.
        """
        found, stack = [], [self]
        while stack:
            current = stack.pop()
            if getattr(current, "generator", None) is not None:
                found.append(current.generator)
            stack.extend(child for _, child in reversed(list(current.children())))
        return found

    def to(self, dtype):
        """Cast every parameter to ``dtype`` (e.g. ``"float64"``) in place and return the module.

        The Parameter objects stay the same, so a weight two modules share (the tied embedding)
        stays shared, and an optimizer built later sees the cast arrays.
        """
        dtype = xp.dtype(dtype)
        for p in self.parameters():
            if p.data.dtype != dtype:
                p.data = p.data.astype(dtype)
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def train(self, mode=True):
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        """name -> a copy of the parameter's array."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays into the parameters; names and shapes must match exactly."""
        own = dict(self.named_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
        for name, p in own.items():
            value = state[name]
            if tuple(value.shape) != p.shape:
                raise CheckpointError(f"state dict entry {name!r} has shape {tuple(value.shape)}, "
                                      f"the model expects {p.shape}")
            p.data[...] = xp.asarray(from_host(value), dtype=p.dtype)

    def num_parameters(self):
        return sum(p.size for p in self.parameters())
