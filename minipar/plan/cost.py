"""Time per step, and the search: enumerate layouts, drop those that do not fit, rank the rest.

Time per step (one rank's view; the slowest stage sets the pace):

    t_f   forward of a micro-batch on the stage: its FLOPs / achieved FLOP/s (+ a per-block overhead
          when calibrated). A block costs 24·b·s·h²(1 + s/6h)/t FLOPs forward, the head 2·b·s·h·V/t
          (the 72·B·L·s·h²(1 + s/6h + V/12hL) of Korthikanti et al. 2022, appendix A, is 3× this
          summed over the model: backward costs twice the forward).
    t_b   2·t_f; recomputation (and minipar's ZeRO-3, which reruns each piece) adds one t_f;
          selective recomputation reruns QKᵀ and P·V: 4·b·s²·h/t FLOPs per block (Korthikanti et al. 2022).
    t_tp  the tensor-parallel collectives of one micro-batch (traffic.py), α–β each: exposed,
          since every layer waits for them.
    t_pp  the micro-batch's pipeline sends: α + nβ each.
    T_mb  = t_f + t_b + t_tp + t_pp + ZeRO-3's gathers per micro-batch.
    pipeline = (m + (p−1)/v)·T_mb: m micro-batches plus the fill and drain, the bubble
          (p−1)/v·T_mb (Huang et al. 2019; Narayanan et al. 2021 for the interleaved 1/v).
    t_dp  the step's data-parallel calls (bucket allreduces, ZeRO's reduce-scatters and
          all-gathers); with overlap the part that fits behind the last micro-batch's backward
          is hidden (Li et al. 2020), the rest is exposed.
    t_opt AdamW streams the rank's parameters, gradients and moments: ~ 2·(bytes held)/bandwidth.
    step  = pipeline + exposed t_dp + t_opt.
"""
import itertools
from dataclasses import dataclass

from minipar.plan.memory import memory_per_rank, parameter_memory
from minipar.plan.model import Strategy, check_strategy, divisors, rank_parameters, rank_pieces, representative_stages
from minipar.plan.traffic import step_calls


@dataclass
class Prediction:
    strategy: Strategy
    memory: dict  # the fullest rank's terms, bytes
    memory_by_stage: list
    time: dict  # seconds: compute, bubble, tp, pp, dp (exposed), optimizer, step
    fits: bool

    @property
    def step(self):
        return self.time["step"]


def _strides(strategy):
    return {"tp": 1, "dp": strategy.tp, "pp": strategy.tp * strategy.dp, "pp-ends": strategy.tp * strategy.dp}


def stage_forward_flops(model, strategy, stage):
    """FLOPs of one micro-batch's forward through this stage's pieces, on one tp rank."""
    b, s, h, t = strategy.micro_batch, model.block_size, model.n_embd, strategy.tp
    block = 24 * b * s * h * h * (1 + s / (6 * h)) / t
    head = 2 * b * s * h * model.vocab_size / t
    return sum(block if piece == "block" else head if piece == "head" else 0.0
               for _, piece in rank_pieces(model, strategy, stage))


def flops_per_step(model, batch_size, recompute_forward=0.0):
    """Model FLOPs 72·B·L·s·h²(1 + s/6h + V/12hL) (Korthikanti et al. 2022, appendix A), plus
    ``recompute_forward`` × one more forward of the layers (1/3 of the 72 for full recomputation)."""
    B, L, s, h, V = batch_size, model.n_layer, model.block_size, model.n_embd, model.vocab_size
    model_flops = 72 * B * L * s * h * h * (1 + s / (6 * h) + V / (12 * h * L))
    return model_flops + recompute_forward * 24 * B * L * s * h * h * (1 + s / (6 * h))


def selective_recompute_flops(model, b, tp):
    """Selective recomputation reruns QKᵀ and P·V per layer: 4·b·s²·h/t FLOPs (Korthikanti et al. 2022)."""
    return 4 * b * model.block_size ** 2 * model.n_embd / tp


def stage_time(model, strategy, machine, stage, overlap):
    """Seconds for the stage: {"compute", "tp", "pp", "dp", "dp_hidden", "optimizer", "micro"} (micro = T_mb)."""
    m, strides = strategy.microbatches, _strides(strategy)
    blocks = sum(piece == "block" for _, piece in rank_pieces(model, strategy, stage))
    t_f = stage_forward_flops(model, strategy, stage) / machine.flops + machine.overhead_per_block * blocks / 3
    reruns = int(strategy.recompute == "full") + int(strategy.effective_zero == 3 and strategy.precision == "fp32")
    compute = (3 + reruns) * t_f  # forward, backward = 2 forwards, each rerun one more forward
    if strategy.recompute == "selective":
        compute += selective_recompute_flops(model, strategy.micro_batch, strategy.tp) * blocks / machine.flops
    comm = {"tp": 0.0, "pp": 0.0, "dp": 0.0, "dp_micro": 0.0}
    sizes = {"tp": strategy.tp, "pp": strategy.pp, "dp": strategy.dp, "pp-ends": 2}
    for call in step_calls(model, strategy, stage):
        kind = "send" if call.kind == "send" else call.kind
        seconds = call.count * machine.collective_time(kind, call.elements * call.itemsize, sizes[call.group],
                                                       strides[call.group])
        group = "pp" if call.group == "pp-ends" else call.group
        if group == "dp" and call.per == "microbatch":
            group = "dp_micro"  # ZeRO-3's gathers: on the critical path of every micro-batch
        comm[group] += seconds
    micro = compute + (comm["tp"] + comm["dp_micro"]) / m + comm["pp"] / m
    hidden = min(comm["dp"], 2 * t_f) if overlap else 0.0
    held = sum(parameter_memory(model, strategy, stage).values())
    optimizer = 2 * held / machine.memory_bandwidth
    return dict(compute=compute, tp=comm["tp"] + comm["dp_micro"], pp=comm["pp"], dp=comm["dp"],
                dp_hidden=hidden, optimizer=optimizer, micro=micro)


def step_time(model, strategy, machine, overlap=False):
    """The step's seconds and their breakdown, from the slowest stage (module docstring)."""
    stages = [stage_time(model, strategy, machine, stage, overlap) for stage in representative_stages(strategy)]
    slow = max(stages, key=lambda t: t["micro"])
    m, bubble_share = strategy.microbatches, (strategy.pp - 1) / strategy.virtual_stages
    worst_dp = max(stages, key=lambda t: t["dp"] - t["dp_hidden"] + t["optimizer"])
    time = {"compute": m * slow["compute"], "bubble": bubble_share * slow["micro"], "tp": slow["tp"],
            "pp": slow["pp"], "dp": worst_dp["dp"] - worst_dp["dp_hidden"], "optimizer": worst_dp["optimizer"]}
    time["step"] = (m + bubble_share) * slow["micro"] + time["dp"] + time["optimizer"]
    return time


def predict(model, strategy, machine, overlap=False):
    memory_by_stage = [memory_per_rank(model, strategy, stage) for stage in representative_stages(strategy)]
    memory = max(memory_by_stage, key=lambda mem: mem["total"])
    return Prediction(strategy, memory, memory_by_stage, step_time(model, strategy, machine, overlap),
                      memory["total"] <= machine.memory_bytes)


def candidate_strategies(model, world, batch_size, gpus_per_node, options):
    """Every layout of ``world`` ranks minipar can run for this model, with the options to try.

    tp only inside a node (its collectives run in every layer, Narayanan et al. 2021, section
    3.2); micro-batches of 1 or 2 rows and the fewest that fill the pipeline (m >= p); the
    memory options given.
    """
    for dp, tp in itertools.product(divisors(world), repeat=2):
        if world % (dp * tp) or tp > gpus_per_node:
            continue
        pp = world // (dp * tp)
        if pp > model.n_layer or batch_size % dp:
            continue
        per_replica = batch_size // dp
        counts = [m for m in divisors(per_replica) if m >= pp]
        # Micro-batches of 1 and 2 rows (the bubble shrinks as m grows) and the fewest that fill the pipeline.
        counts = sorted({m for m in counts if per_replica // m in (1, 2)} | set(counts[:1]))
        for m, zero, sp, recompute in itertools.product(counts, options.get("zero", (0,)), options.get("sp", (False,)),
                                                        options.get("recompute", ("",))):
            if zero and dp == 1 or sp and tp == 1:
                continue
            strategy = Strategy(dp, tp, pp, batch_size, m, "1f1b", 1, zero, sp, recompute,
                                options.get("precision", "fp32"))
            if check_strategy(model, strategy) is None:
                yield strategy


def rank_layouts(model, machine, batch_size, options, overlap=True):
    """(fitting predictions sorted by step time, all predictions) for ``machine.gpus`` ranks."""
    predictions = [predict(model, s, machine, overlap)
                   for s in candidate_strategies(model, machine.gpus, batch_size, machine.gpus_per_node, options)]
    fitting = sorted((p for p in predictions if p.fits), key=lambda p: p.step)
    return fitting, predictions


def parameters_on_rank(model, strategy, stage):
    return sum(n for _, _, n in rank_parameters(model, strategy, stage))
