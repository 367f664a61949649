"""Expert parallelism: a mixture-of-experts layer's experts sharded over the ep group, tokens
moved to them and back by all-to-all (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021).

N ranks form the ep group; rank j holds experts [j E/N, (j+1) E/N) and its own share of the
batch, as a data-parallel rank does (the ep group is carved out of the data dimension, as in
DeepSpeed-MoE and Megatron-LM). The router is replicated. One layer on rank j:

    route its own T_j tokens (one GShard group)      slots (E, C_e, C): expert e's C_e slots
    dispatch: all-to-all                             block i of (N, E/N, C_e, C) goes to rank i,
                                                     -> (N source ranks, E/N, C_e, C) here
                                                     -> (E/N, N C_e, C): each local expert's slots from every rank
    run the E/N local experts
    combine: all-to-all back                         (E/N, N C_e, C) -> (N, E/N, C_e, C), block i to rank i
                                                     -> (E, C_e, C): every expert's answers for our tokens
    weight by the gates and sum per token

An all-to-all that exchanges equal blocks is a permutation of the entries across ranks, so
its adjoint is the inverse permutation: the all-to-all going the other way. Hence two ops, as
tensor parallelism's f and g are a pair,

    Dispatch:  forward  tokens -> experts (all-to-all)     backward  experts -> tokens (all-to-all)
    Combine:   forward  experts -> tokens (all-to-all)     backward  tokens -> experts (all-to-all)

Bytes per rank per layer, forward: each all-to-all sends the E C_e C-element slot buffer but
the rank's own $E/N$ experts' part, $(N−1)/N$ of it, and receives as much; with $C_e = CF k T_j/E$
that is $CF·k·T_j·C·(N−1)/N$ elements each way, for dispatch and again for combine (about
$2·k·T·C·(N−1)/N$ at $CF = 1$); backward moves the same again (docs/expert_parallel.md).

Which gradients are averaged where (``average_gradients``). With $D$ data-parallel ranks in all
($D$ = dp · ep), rank $r$'s loss $L_r$ is the mean over its own tokens and the single-process
gradient is $(1/D) Σ_r ∂L_r/∂θ$. A dense parameter (router, attention, ...) sees only its own
rank's tokens: allreduce-sum over all $D$ ranks, divide by $D$. An expert on ep rank $j$ already
received, through the all-to-all's backward, the gradient of every ep rank's tokens; the same
expert also lives on the dp ranks that share ep index j: allreduce-sum over those dp ranks
(the expert-data-parallel group), divide by D.
"""
from minipar.backend import xp
from minipar.errors import ConfigError
from minipar.nn.moe import Experts, MixtureOfExperts, expert_parameter_ids
from minipar.parallel.sharding import Shard
from minipar.tensor import Function

# ---- the all-to-alls on arrays ----------------------------------------------------------------

def tokens_to_experts(slots, communicator, algorithm="mpi"):
    """(E, C_e, C) slots of this rank's tokens -> (E/N, N C_e, C): the local experts' slots from every rank."""
    size = communicator.size
    n_experts, capacity, width = slots.shape
    received = xp.empty((size, n_experts // size, capacity, width), dtype=slots.dtype)
    communicator.alltoall(xp.ascontiguousarray(slots).reshape(received.shape), received, algorithm=algorithm)
    return xp.ascontiguousarray(received.transpose(1, 0, 2, 3)).reshape(n_experts // size, size * capacity, width)


def experts_to_tokens(outputs, communicator, algorithm="mpi"):
    """(E/N, N C_e, C) local experts' outputs -> (E, C_e, C): every expert's answers for this rank's tokens."""
    size = communicator.size
    local_experts, slots, width = outputs.shape
    capacity = slots // size
    by_rank = xp.ascontiguousarray(outputs.reshape(local_experts, size, capacity, width).transpose(1, 0, 2, 3))
    received = xp.empty_like(by_rank)
    communicator.alltoall(by_rank, received, algorithm=algorithm)
    return received.reshape(size * local_experts, capacity, width)


# ---- the pair of autograd ops -------------------------------------------------------------------

class Dispatch(Function):
    """Forward: tokens to their experts (all-to-all). Backward: the gradients back to the tokens' ranks."""

    @staticmethod
    def forward(ctx, slots, communicator, algorithm="mpi"):
        ctx.communicator, ctx.algorithm = communicator, algorithm
        return tokens_to_experts(slots, communicator, algorithm)

    @staticmethod
    def backward(ctx, grad):
        return experts_to_tokens(grad, ctx.communicator, ctx.algorithm)


class Combine(Function):
    """Forward: expert outputs back to the tokens' ranks (all-to-all). Backward: the gradients to the experts."""

    @staticmethod
    def forward(ctx, outputs, communicator, algorithm="mpi"):
        ctx.communicator, ctx.algorithm = communicator, algorithm
        return experts_to_tokens(outputs, communicator, algorithm)

    @staticmethod
    def backward(ctx, grad):
        return tokens_to_experts(grad, ctx.communicator, ctx.algorithm)


# ---- the layer ------------------------------------------------------------------------------------

def validate_expert_parallel(n_experts, ep, data_ranks):
    """Refuse a layout that cannot shard the experts, with the numbers (same answer on every rank)."""
    problems = []
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ConfigError(f"ep must be a positive integer, got {ep!r}")
    if n_experts % ep:
        problems.append(f"the number of experts ({n_experts}) must be divisible by ep ({ep})")
    if data_ranks % ep:
        problems.append(f"ep ({ep}) must divide the data-parallel ranks ({data_ranks}): the ep group is carved "
                        "out of the data dimension")
    if problems:
        raise ConfigError("; ".join(problems))


class ExpertParallelMixtureOfExperts(MixtureOfExperts):
    """``full`` (a single-process MixtureOfExperts) with its experts sharded over ``communicator``.

    Rank j keeps experts [j E/N, (j+1) E/N), exact slices of ``full``'s, labelled with a
    ``Shard`` on axis 0 under ``prefix`` + their name; the router is copied whole. Each rank
    routes its own tokens as one group, so N ranks equal ``full`` with ``groups = N`` on the
    ranks' batches stacked in rank order.
    """

    def __init__(self, full, communicator, prefix="", algorithm="mpi"):
        size, index = communicator.size, communicator.rank
        validate_expert_parallel(full.n_experts, size, size)
        hidden, bias = full.experts.hidden.weight.shape[-1], full.experts.hidden.bias is not None
        super().__init__(full.width, full.n_experts, full.top_k, full.capacity_factor, full.aux_loss_weight,
                         hidden=hidden, bias=bias, groups=1, aux_loss_in_backward=full.aux_loss_in_backward,
                         experts=Experts(full.n_experts // size, full.width, hidden, bias))
        self.communicator, self.algorithm, self.aux_loss_scale = communicator, algorithm, full.aux_loss_scale
        full_parameters = dict(full.named_parameters())
        experts = expert_parameter_ids(self)
        for name, p in self.named_parameters():
            p.shard = Shard(prefix + name, axis=0, index=index, count=size) if id(p) in experts else Shard(prefix + name)
            p.data = p.shard.take(full_parameters[name].data).astype(full_parameters[name].dtype)

    def run_experts(self, slots, routing):
        """(E C_e, C) slots of this rank's tokens -> dispatch -> local experts -> combine -> (E C_e, C)."""
        width = slots.shape[-1]
        by_expert = slots.reshape(self.n_experts, routing.capacity, width)
        local = Dispatch.apply(by_expert, communicator=self.communicator, algorithm=self.algorithm)
        answers = Combine.apply(self.experts(local), communicator=self.communicator, algorithm=self.algorithm)
        return answers.reshape(-1, width)  # (E/N, N C_e, C) went out, (E, C_e, C) came back


# ---- gradients: which ranks average which parameters -----------------------------------------------

def gradient_averaging_axes(parameter, expert_ids):
    """The mesh axes a parameter's gradient is summed over before dividing by dp·ep: ("dp",) for an
    expert (the ep ranks hold different experts), ("dp", "ep") for a dense parameter."""
    return ("dp",) if id(parameter) in expert_ids else ("dp", "ep")


def average_gradients(parameters, expert_ids, data_communicator, expert_data_communicator):
    """Turn local gradients into the single-process gradient (module docstring), in place.

    ``data_communicator``: all D = dp·ep ranks of the data dimension (dense parameters);
    ``expert_data_communicator``: the dp ranks holding the same experts (expert parameters).
    """
    scale = 1.0 / data_communicator.size
    for p in parameters:
        group = expert_data_communicator if id(p) in expert_ids else data_communicator
        if p.grad is None:
            p.grad = xp.zeros_like(p.data)
        group.allreduce(p.grad)
        p.grad *= scale
