"""The context (cp) and expert (ep) axes in a training layout: what the Trainer asks of them.

Both split a data-parallel replica's work further (parallel/context_parallel*.py,
parallel/expert_parallel.py). On one pipeline stage:

    data ranks  D = dp · ep: each takes B/D rows of the global batch; the ep group is carved out of
                the data dimension (DeepSpeed-MoE, Megatron-LM), so an expert-parallel rank takes
                its own rows as a dp rank does. Data rank = dp_rank · ep + ep_rank.
    cp ranks    each holds T/cp tokens of each of those rows: its layout's chunks, at their
                positions (contiguous: chunk i; zigzag: chunks i and 2cp-1-i).

Rank r's loss L_r is the mean over its B/D · T/cp tokens, and the single-process loss is the
mean of the L_r over the D · cp ranks (each holds as many tokens). So each rank back-propagates
L_r / (cp · ep), its part of its dp replica's loss (the executor's ``loss_scale``; 1/m more per
micro-batch), and the placements (parallel/placement.py) say the rest:

    every parameter, on cp        Partial("sum"): it saw T/cp of the positions
    a dense parameter, on ep      Partial("sum"): it saw this ep rank's rows only
    an expert's weights, on ep    Shard(0): rank j holds experts [j E/ep, (j+1) E/ep) and, through
                                  the all-to-all's backward, already the gradient of every ep
                                  rank's tokens routed to them
    everything, on dp             Partial("avg"), as before: the gradient sync over the dp ranks,
                                  which hold the same experts

The Trainer's sums then do it all: the dp average, then ``PartialGradientSum`` over cp and ep.
The norm sums over ep, where the experts are sharded, counting the dense parameters on ep rank 0.
A mixture of experts' auxiliary loss is part of the rank's loss, so it takes the same scale.
"""
from minipar.errors import ConfigError
from minipar.nn.moe import MixtureOfExperts, expert_parameter_ids
from minipar.parallel.batch_split import local_slice
from minipar.parallel.context_parallel import LAYOUTS, VARIANTS, check_layout
from minipar.parallel.context_parallel_model import context_parallel_pieces, split_tokens
from minipar.parallel.expert_parallel import ExpertParallelMixtureOfExperts, validate_expert_parallel
from minipar.parallel.placement import Partial, Shard, place


def check_options(config):
    """The cp and ep options alone (TrainConfig.__post_init__), one sentence each."""
    if config.cp_layout not in LAYOUTS:
        raise ConfigError(f"--cp-layout must be one of {list(LAYOUTS)}, got {config.cp_layout!r}")
    if config.cp_attention not in VARIANTS:
        raise ConfigError(f"--cp-attention must be one of {list(VARIANTS)}, got {config.cp_attention!r}")
    if config.batch_size % (config.dp * config.ep * config.microbatches):
        raise ConfigError(f"global batch size {config.batch_size} must be divisible by dp x ep x microbatches "
                          f"= {config.dp} x {config.ep} x {config.microbatches}: each data rank takes its own rows")


def check_model(model_config, config):
    """What cp and ep need of the model (TrainConfig.check_model), the same on every rank."""
    if config.cp > 1:
        check_layout(model_config.block_size, config.cp, config.cp_layout)  # refuses, in one sentence
        local = model_config.block_size // config.cp
        if config.sequence_parallel and local % config.tp:
            raise ConfigError(f"sequence parallelism splits each cp rank's {local} tokens over the tp ranks, so "
                              f"block_size / cp ({local}) must be divisible by tp ({config.tp})")
        if model_config.n_experts:
            raise ConfigError("--experts with --cp > 1 is not supported: the router would count capacity and the "
                              "balance loss over each cp rank's tokens, not the sequence's")
    if model_config.n_experts and config.sequence_parallel:
        raise ConfigError("--experts with --sequence-parallel is not supported: tp ranks would route different "
                          "tokens; use tensor parallelism without it")
    if config.ep > 1:
        if not model_config.n_experts:
            raise ConfigError(f"--ep {config.ep} shards the experts of a mixture of experts: add --experts E "
                              f"(a multiple of {config.ep})")
        validate_expert_parallel(model_config.n_experts, config.ep, config.dp * config.ep)


def swap_layers(pieces, mesh, config):
    """This rank's pieces with its experts only (ep) and attention over its cp group (cp)."""
    if config.ep > 1:
        for index, piece in enumerate(pieces):
            if isinstance(getattr(piece, "mlp", None), MixtureOfExperts):  # a block: pieces[1 + i] is block i
                piece.mlp = ExpertParallelMixtureOfExperts(piece.mlp, mesh.group("ep"), prefix=f"blocks.{index - 1}.mlp.")
    if config.cp > 1:
        pieces = context_parallel_pieces(pieces, mesh.group("cp"), config.cp_layout, config.cp_attention,
                                         config.cp_overlap)
    for layer in mixtures_of_experts(pieces):  # its aux loss is part of this rank's micro-batch loss
        layer.aux_loss_scale = loss_scale(config) / config.microbatches
    return pieces


def mixtures_of_experts(modules):
    """Every MixtureOfExperts layer inside ``modules``."""
    found, stack = [], list(modules)
    while stack:
        module = stack.pop()
        if isinstance(module, MixtureOfExperts):
            found.append(module)
        stack.extend(child for _, child in module.children())
    return found


def loss_scale(config):
    """What each rank's loss is multiplied by before backward (module docstring): 1/(cp · ep)."""
    return 1.0 / (config.cp * config.ep)


def place_on_axes(parameter, expert_ids, config):
    """Record ``parameter``'s placement on cp and ep (module docstring)."""
    if config.cp > 1:
        place(parameter, cp=Partial("sum"))
    if config.ep > 1:
        place(parameter, ep=Shard(0) if id(parameter) in expert_ids else Partial("sum"))


def experts_of(pieces):
    """ids of the expert parameters among ``pieces`` (those expert parallelism shards)."""
    return set().union(*(expert_parameter_ids(piece) for piece in pieces))


def local_batch(inputs, targets, mesh, config):
    """The global (B, T) batch -> this rank's (B/(dp ep), T/cp) rows and tokens (module docstring)."""
    data_rank = mesh.coordinate("dp") * config.ep + mesh.coordinate("ep")
    inputs, targets = local_slice((inputs, targets), data_rank, config.dp * config.ep)  # (B/D, T)
    if config.cp > 1:
        cp_rank = mesh.coordinate("cp")
        inputs, targets = (split_tokens(a, cp_rank, config.cp, config.cp_layout) for a in (inputs, targets))
    return inputs, targets  # (B/D, T/cp)
