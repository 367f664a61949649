"""A mixture-of-experts layer, usable in place of a Block's MLP (docs/expert_parallel.md).

A router sends each token to k of E expert MLPs, so the layer holds E times an MLP's
weights but spends about k MLPs' work per token (Shazeer et al. 2017; GShard, Lepikhin et
al. 2020; Switch Transformer, Fedus et al. 2021):

    x (B, T, C) -> tokens (N, C), N = B T, cut into G groups of T_g = N/G tokens
    router    p = softmax(x W_r)                               (N, E), W_r (C, E)
    top-k     the k experts of largest p for each token; on a tie the lower expert number
    gates     g_tj = p_t,e_j / sum_j' p_t,e_j'   (k >= 2, renormalised over the chosen experts)
              g_t  = p_t,e                       (k = 1: renormalising would give 1, and the router
                                                  would get no gradient from the task; Switch keeps p)
    capacity  each expert takes at most  C_e = ceil(CF · k · T_g / E)  tokens of each group
    dispatch  slots (G, E, C_e, C): the tokens each expert accepted, zero rows elsewhere
    experts   y_e = W2_e GELU(W1_e s + b1_e) + b2_e  on expert e's slots, (E, G C_e, C)
    combine   out_t = sum over t's accepted choices j of  g_tj · y_(e_j, slot of t)
    aux loss  alpha · E · sum_i f_i P_i, averaged over the groups, where in a group
              f_i = (choices of expert i, before capacity) / (k T_g)   and   P_i = mean_t p_t,i

Drop rule (deterministic). Within a group, choices claim slots in priority order: every
token's first choice before any token's second choice (GShard's order, so a token's best
expert is the last thing it loses), and within one choice rank, tokens in order of position
in the flattened (B, T) batch. A choice that finds its expert's C_e slots taken is dropped:
its term leaves the sum, the gates are not renormalised again, and a token dropped by all k
choices gets 0 from this layer and passes through the block's residual connection unchanged.

The aux loss is Switch's load-balancing loss. At perfect balance f_i = P_i = 1/E and it
equals alpha; f has no gradient (counts), P carries it back into the router. With
``aux_loss_in_backward`` (the default) the layer adds alpha·(the loss) to the objective
itself, through ``ops.attach_auxiliary_loss``: the model's loss need not know the layer is
there, on any pipeline stage. Set ``aux_loss_scale`` to 1/m under m micro-batches.

Evaluation (``model.eval()``) never drops: capacity is T, so a prediction does not depend on
which other tokens share its batch (Switch, too, evaluates with a larger capacity factor).

Groups (GShard): capacity is counted within each group of T_g tokens. An expert-parallel
rank's own tokens form one group (parallel/expert_parallel.py), so ep = N equals this layer
with ``groups = N`` on the ranks' batches stacked, drops included.
"""
import math
from dataclasses import dataclass

from minipar import ops
from minipar.backend import host_rng, xp
from minipar.errors import ConfigError, ShapeError
from minipar.nn.layers import Linear, zeros
from minipar.nn.module import Module, Parameter


def expert_capacity(tokens_per_group, n_experts, top_k, capacity_factor):
    """C_e = ceil(CF · k · T_g / E): slots per expert per group. CF = E/k gives T_g (no drops ever).
    (The 1e-9 keeps a product that is whole in exact arithmetic, 1.1 · 2 · 50 / 11, from rounding up.)"""
    return max(1, math.ceil(capacity_factor * top_k * tokens_per_group / n_experts - 1e-9))


@dataclass
class Routing:
    """Where every token goes, as integer arrays of the backend (routing is not differentiable)."""

    chosen: object  # (N, k) expert of each choice
    slot: object  # (N, k) index into the flat (G E C_e) slots, -1 if the choice was dropped
    token_of_slot: object  # (G E C_e,) the token in each slot, -1 if empty
    routed: object  # (G, E) choices of each expert before capacity
    kept: object  # (G, E) choices each expert accepted
    groups: int
    capacity: int


def route(probabilities, top_k, capacity_factor, groups=1):
    """Top-k choices and the drop rule (module docstring) for router probabilities (N, E)."""
    tokens, n_experts = probabilities.shape
    if tokens % groups:
        raise ShapeError(f"mixture of experts: {tokens} tokens do not split into {groups} equal groups")
    per_group = tokens // groups
    capacity = expert_capacity(per_group, n_experts, top_k, capacity_factor)
    chosen = xp.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]  # (N, k), ties -> lower index
    # Priority order inside each group: choice rank first, then token position.
    order = chosen.reshape(groups, per_group, top_k).transpose(0, 2, 1).reshape(groups, top_k * per_group)
    one_hot = order[..., None] == xp.arange(n_experts)  # (G, k T_g, E)
    position = xp.take_along_axis(xp.cumsum(one_hot, axis=1), order[..., None], axis=2)[..., 0] - 1
    routed = one_hot.sum(axis=1)  # (G, E)
    kept = xp.minimum(routed, capacity)
    group_base = (xp.arange(groups) * n_experts)[:, None]
    slot = xp.where(position < capacity, (group_base + order) * capacity + position, -1)  # (G, k T_g)
    slot_by_token = slot.reshape(groups, top_k, per_group).transpose(0, 2, 1).reshape(tokens, top_k)
    # The inverse map, slot -> token, without a data-dependent shape (no host sync on a GPU): sorting
    # the choices by expert, stably, lists each expert's in priority order, so slot c of expert e
    # holds the c-th of e's run, if e accepted more than c.
    by_expert = xp.argsort(order, axis=1, kind="stable")  # (G, k T_g)
    run_start = xp.cumsum(routed, axis=1) - routed  # (G, E)
    rank_in_run = xp.arange(capacity)
    picked = xp.minimum(run_start[..., None] + rank_in_run, top_k * per_group - 1).reshape(groups, -1)
    choice = xp.take_along_axis(by_expert, picked, axis=1)  # (G, E C_e) index into the group's k T_g choices
    token = choice % per_group + (xp.arange(groups) * per_group)[:, None]
    filled = (rank_in_run < kept[..., None]).reshape(groups, -1)
    token_of_slot = xp.where(filled, token, -1).reshape(-1)
    return Routing(chosen, slot_by_token, token_of_slot, routed, kept, groups, capacity)


class ExpertLinear(Module):
    """E independent affine maps side by side: (E, S, in) -> (E, S, out), weight (E, in, out)."""

    def __init__(self, n_experts, in_features, out_features, bias=True):
        self.weight = Parameter(zeros(n_experts, in_features, out_features))
        self.bias = Parameter(zeros(n_experts, out_features)) if bias else None

    def forward(self, x):  # (E, S, in)
        out = ops.matmul(x, self.weight)  # one batched product over the expert axis
        if self.bias is not None:
            out = out + ops.reshape(self.bias, (self.bias.shape[0], 1, self.bias.shape[1]))
        return out


class Experts(Module):
    """E expert MLPs, C -> H -> GELU -> C, their weights stacked along a leading expert axis
    (so expert parallelism shards them by slicing that axis)."""

    def __init__(self, n_experts, width, hidden, bias=True):
        self.hidden = ExpertLinear(n_experts, width, hidden, bias)
        self.output = ExpertLinear(n_experts, hidden, width, bias)

    def forward(self, slots):  # (E, S, C) -> (E, S, C)
        return self.output(ops.gelu(self.hidden(slots)))


class MixtureOfExperts(Module):
    """Top-k routed experts in place of an MLP: (B, T, C) -> (B, T, C). See the module docstring.

    After each forward: ``aux_loss`` (the load-balancing loss; detached when the layer already
    sends it into backward) and ``routing`` (a ``Routing``: choices, drops, tokens per expert).
    """

    def __init__(self, width, n_experts, top_k=2, capacity_factor=1.25, aux_loss_weight=0.01, hidden=None,
                 bias=True, groups=1, aux_loss_in_backward=True, experts=None):
        if not isinstance(n_experts, int) or n_experts < 1 or top_k not in (1, 2) or top_k > n_experts:
            raise ConfigError(f"mixture of experts needs n_experts >= 1 and top_k 1 or 2, at most n_experts; "
                              f"got n_experts={n_experts!r}, top_k={top_k!r}")
        if not capacity_factor > 0 or aux_loss_weight < 0:
            raise ConfigError(f"capacity_factor must be > 0 and aux_loss_weight >= 0, got {capacity_factor!r} "
                              f"and {aux_loss_weight!r}")
        self.n_experts, self.top_k, self.width = n_experts, top_k, width
        self.capacity_factor, self.aux_loss_weight = capacity_factor, aux_loss_weight
        self.groups, self.aux_loss_in_backward, self.aux_loss_scale = groups, aux_loss_in_backward, 1.0
        self.router = Linear(width, n_experts, bias=False)
        # ``experts``: an Experts module to use instead of E new ones (expert parallelism passes its E/N)
        self.experts = Experts(n_experts, width, 4 * width if hidden is None else hidden, bias) if experts is None \
            else experts
        self.aux_loss, self.routing = None, None

    def reset_parameters(self, seed, std=0.02, output_std=None):
        """Weights ~ N(0, std) (the experts' output weights N(0, output_std) if given), biases 0,
        drawn in parameter order from one seeded generator."""
        generator = host_rng(seed)
        for name, p in self.named_parameters():
            scale = output_std if output_std is not None and name == "experts.output.weight" else std
            values = xp.zeros(p.shape) if name.endswith("bias") else xp.asarray(generator.normal(0.0, scale, p.shape))
            p.data[...] = values.astype(p.dtype)
        return self

    def forward(self, x):  # (B, T, C)
        tokens = ops.reshape(x, (-1, x.shape[-1]))  # (N, C)
        probabilities = ops.softmax(self.router(tokens))  # (N, E)
        if self.training:
            routing = route(probabilities.data, self.top_k, self.capacity_factor, self.groups)
        else:  # evaluation never drops: room for every token (one group, CF = E/k)
            routing = route(probabilities.data, self.top_k, self.n_experts / self.top_k, 1)
        gates = self.gates(probabilities, routing.chosen)  # (N, k)
        aux = self.balance_loss(probabilities, routing)
        slots = ops.gather_rows(tokens, routing.token_of_slot)  # (G E C_e, C), zeros where empty
        outputs = self.run_experts(slots, routing)  # (G E C_e, C)
        picked = ops.gather_rows(outputs, routing.slot.reshape(-1))  # (N k, C), zeros where dropped
        out = (ops.reshape(picked, (*gates.shape, -1)) * ops.reshape(gates, (*gates.shape, 1))).sum(axis=1)
        out = ops.reshape(out, x.shape)
        self.routing = routing
        if self.aux_loss_in_backward:
            self.aux_loss = aux.detach()
            return ops.attach_auxiliary_loss(out, aux, self.aux_loss_scale)
        self.aux_loss = aux
        return out

    def gates(self, probabilities, chosen):
        """(N, k) weights of the chosen experts: $p$ renormalised over them ($k ≥ 2$), $p$ itself ($k = 1$)."""
        picked = ops.getitem(probabilities, (xp.arange(chosen.shape[0])[:, None], chosen))
        return picked if self.top_k == 1 else picked / picked.sum(axis=-1, keepdims=True)

    def balance_loss(self, probabilities, routing):
        """alpha · E · mean over groups of sum_i f_i P_i (Fedus et al. 2021, eq. 4-6)."""
        groups, n_experts = routing.groups, self.n_experts
        fractions = routing.routed / (self.top_k * (probabilities.shape[0] // groups))  # (G, E), no gradient
        mean_probabilities = ops.reshape(probabilities, (groups, -1, n_experts)).mean(axis=1)  # (G, E)
        return (mean_probabilities * xp.asarray(fractions, dtype=probabilities.dtype)).sum() * (
            self.aux_loss_weight * n_experts / groups)

    def run_experts(self, slots, routing):
        """Every expert on its slots from all groups at once: (G E C_e, C) -> (G E C_e, C).

        Expert parallelism overrides this with an all-to-all on each side (parallel/expert_parallel.py).
        """
        groups, capacity, width = routing.groups, routing.capacity, slots.shape[-1]
        by_expert = ops.reshape(slots, (groups, self.n_experts, capacity, width)).transpose(1, 0, 2, 3)
        outputs = self.experts(ops.reshape(by_expert, (self.n_experts, groups * capacity, width)))
        by_group = ops.reshape(outputs, (self.n_experts, groups, capacity, width)).transpose(1, 0, 2, 3)
        return ops.reshape(by_group, (-1, width))


def expert_parameter_ids(module):
    """ids of the parameters inside ``Experts`` modules below ``module`` (the ones expert parallelism shards)."""
    found, stack = set(), [module]
    while stack:
        current = stack.pop()
        if isinstance(current, Experts):
            found.update(id(p) for p in current.parameters())
            continue
        stack.extend(child for _, child in current.children())
    return found


def use_experts(model, n_experts, top_k=2, capacity_factor=1.25, aux_loss_weight=0.01, groups=1, seed=None):
    """Replace every block's MLP in a GPT by a MixtureOfExperts, in place; returns the model.

    GPT-2's initialisation, per layer from seed ``model.config.seed + 1000 + layer``: router
    and first expert weights N(0, 0.02), the experts' output weights N(0, 0.02/sqrt(2 n_layer))
    (they write into the residual stream), biases 0. Parameters get their full names
    (``blocks.3.mlp.router.weight``), as GPT gives its own.
    """
    config = model.config
    seed = config.seed + 1000 if seed is None else seed
    dtype = model.embedding.token.weight.dtype
    for index, block in enumerate(model.blocks):
        block.mlp = MixtureOfExperts(config.n_embd, n_experts, top_k, capacity_factor, aux_loss_weight,
                                     bias=config.bias, groups=groups).to(dtype)
        block.mlp.reset_parameters(seed + index, 0.02, 0.02 / math.sqrt(2 * config.n_layer))
        for name, p in block.mlp.named_parameters():
            p.name = f"blocks.{index}.mlp.{name}"
    return model
