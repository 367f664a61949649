"""Optimizers and learning-rate schedules.

With $θ$ a parameter, $g$ its gradient, $η$ the learning rate (``lr``), $μ$ the momentum,
$β₁, β₂$ the betas, $ε$ ``eps``, $λ$ the weight decay and $t$ the step:

- SGD: $θ ← θ − η g$
- SGD with momentum: $u ← μ u + g$, then $θ ← θ − η u$
- AdamW (Loshchilov & Hutter 2019, decoupled weight decay; Adam: Kingma & Ba 2015):

$$m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²$$

$$m̂ = m / (1 − β₁ᵗ),   v̂ = v / (1 − β₂ᵗ)$$

$$θ ← θ − η (m̂ / (√v̂ + ε) + λ θ)$$

The update of one parameter uses only that parameter's own gradient and state: that is
why a tensor-parallel rank can update its shard alone ($θ_j ← θ_j − η g_j$) and
ZeRO can split the optimizer state across data-parallel ranks.
"""
import math

from minipar.backend import ON_DEVICE, xp
from minipar.errors import ConfigError


def _as_groups(params, **defaults):
    """Accept a list of parameters or a list of {"params": [...], option: value} groups."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**defaults, **group, "params": list(group["params"])} for group in params]
    return [{**defaults, "params": params}]


class Optimizer:
    def __init__(self, groups):
        self.groups = groups
        self.step_count = 0

    @property
    def parameters(self):
        return [p for group in self.groups for p in group["params"]]

    def set_lr(self, lr):
        for group in self.groups:
            group["lr"] = lr

    def zero_grad(self):
        for p in self.parameters:
            p.grad = None

    def step(self):
        self.step_count += 1
        for group in self.groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, p.grad, group)

    def update(self, parameter, grad, group):
        raise NotImplementedError


class SGD(Optimizer):
    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0):
        if lr < 0 or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"SGD needs lr >= 0 and momentum in [0, 1), got lr={lr}, momentum={momentum}")
        super().__init__(_as_groups(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.state = {}

    def update(self, parameter, grad, group):
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * parameter.data
        if group["momentum"]:
            state = self.state.setdefault(id(parameter), {"momentum": xp.zeros_like(parameter.data)})
            velocity = state["momentum"]
            velocity *= group["momentum"]
            velocity += grad
            grad = velocity
        parameter.data -= group["lr"] * grad


class AdamW(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        if lr < 0 or not all(0.0 <= b < 1.0 for b in betas) or eps <= 0:
            raise ConfigError(f"AdamW needs lr >= 0, betas in [0, 1), eps > 0; got {lr}, {betas}, {eps}")
        super().__init__(_as_groups(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state = {}

    def step(self):
        self.step_count += 1
        for group in self.groups:
            beta1, beta2 = group["betas"]
            # Fold both bias corrections into one step size (Kingma & Ba 2015, section 2).
            step_size = group["lr"] * math.sqrt(1 - beta2**self.step_count) / (1 - beta1**self.step_count)
            eps_hat = group["eps"] * math.sqrt(1 - beta2**self.step_count)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(id(p))
                if state is None:
                    state = self.state[id(p)] = {"m": xp.zeros_like(p.data), "v": xp.zeros_like(p.data)}
                m, v, grad = state["m"], state["v"], p.grad
                m *= beta1
                m += (1 - beta1) * grad
                v *= beta2
                v += (1 - beta2) * grad * grad
                if group["weight_decay"]:
                    p.data *= 1 - group["lr"] * group["weight_decay"]
                p.data -= step_size * m / (xp.sqrt(v) + eps_hat)


def decay_groups(named_parameters, weight_decay):
    """Weight decay on matrices only; biases and LayerNorm gains are left alone (as GPT-2 training does)."""
    named = list(named_parameters)
    return [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]


def grad_norm_squared(tensors, communicators=()):
    """$‖g‖² = Σ g²$ over the gradients of ``tensors`` (in float64), then summed over each of
    ``communicators``: the whole model's, when every rank passes the tensors only it counts.

    A 0-d array: on a GPU it stays there, so the step neither copies it nor waits for it."""
    buffer = xp.zeros(1, dtype=xp.float64)
    for t in tensors:
        if t.grad is not None:
            buffer += (t.grad.astype(xp.float64, copy=False) ** 2).sum()  # float64 gradients: no copy
    for communicator in communicators:
        communicator.allreduce(buffer)
    return buffer[0]


def clip_grad_norm(parameters, max_norm, total_norm_squared=None):
    """Scale all gradients by min(1, max_norm / ||g||), ||g|| over all of them together.

    A parallel run passes ``total_norm_squared``, the sum of squares over the whole model
    (``grad_norm_squared`` with every shard counted once), so every rank clips by the same
    factor as one process would. Returns the norm before clipping (a 0-d array).

    On a GPU the factor min(1, scale) is applied even when it is 1 (exactly): deciding on the
    host would copy the norm there and wait for the GPU on every step.
    """
    parameters = [p for p in parameters if p.grad is not None]
    if total_norm_squared is None:
        total_norm_squared = grad_norm_squared(parameters)
    total_norm = xp.sqrt(total_norm_squared)
    scale = max_norm / (total_norm + 1e-6)
    if ON_DEVICE or scale < 1.0:
        factor = xp.minimum(scale, 1.0)
        for p in parameters:
            p.grad *= factor.astype(p.grad.dtype)  # in the gradient's precision, as a Python float would be
    return total_norm


def cosine_learning_rate(step, max_lr, warmup_steps, total_steps, min_lr=None):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    min_lr = max_lr / 10 if min_lr is None else min_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
