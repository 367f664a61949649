"""Time per step: per micro-batch on each stage, the pipeline and its bubble, the exposed communication.

Per micro-batch on a stage (one rank's view; the slowest stage sets the pace):

    F, B  forward and backward of the stage's pieces. GPU profiles: kernels.py (GEMMs at a
          shape-dependent efficiency, memory-bound kernels at the HBM bandwidth). A calibration
          file: every GEMM (forward and its two backward products) at the FLOP/s ``calibrate``
          measured for its shape class, plus the fitted per-block rest (kernels.py); a file
          without that table: FLOPs / the FLOP/s measured on real blocks + a per-block overhead,
          B = 2F.
    R     recomputation: full reruns F; selective reruns the attention core (kernels.py);
          minipar's ZeRO-3 reruns each piece's forward in its backward (one more F).
    comm  the tensor-, context- and expert-parallel collectives of the micro-batch (traffic.py),
          each at its α–β time: exposed, every layer waits for them; the pipeline's sends
          (Megatron's scatter/gather sends 1/t of them across nodes, Narayanan et al. 2021 §4.1).
    T_mb  = F + B + R + comm.

The pipeline: m·T_mb plus the bubble. The bubble comes from the pipeline simulator
(parallel/pipeline/simulator.py) for the schedules it knows (``SIMULATED``), run on the stage's
own F and B + R; for large p·m·v, where the simulator is slow, from its closed form
$(p − 1)/v·T_mb$, which the tests check equals the simulator. The zero-bubble schedules (Qi et al.
2023), until the simulator has them, from the paper's formulas, with B split evenly into B_input
and W: ZB-H1 $(p−1)(F + B_{in} − W)$, ZB-H2 and ZB-V $(p−1)·max(0, F + B_{in} − 2W)$. To move a schedule
to the simulator, add its name to ``SIMULATED``.

The data-parallel collectives once per step (gradient sync, ZeRO's gathers) and what hides them
depend on the engine (``Strategy.engine``):

    minipar       what minipar does: with --overlap (the CLI's default for it) plain data
                  parallelism's bucket allreduces and ZeRO's reduce-scatters run during backward;
                  ZeRO-2/3 reduce-scatter after every micro-batch (m× the reduce-scatter volume,
                  booked in traffic.py), each behind its own backward; ZeRO-3's gathers wait in
                  every micro-batch.
    ideal         the papers' engines (Megatron-LM, DeepSpeed), labelled as such: every
                  data-parallel collective runs beside the compute it can overlap (the last
                  backward; ZeRO-3's prefetched gathers beside every micro-batch), costing
                  max(compute, comm) + OVERLAP_LOSS·min(compute, comm).

    step  = pipeline + exposed data-parallel time + AdamW (it streams the rank's model states).
"""
import functools
from dataclasses import dataclass

from minipar.plan.kernels import cpu_head_times, cpu_layer_times, head_compute_times, layer_compute_times
from minipar.plan.memory import memory_per_rank, state_bytes
from minipar.plan.strategy import Strategy, rank_pieces, representative_stages
from minipar.plan.traffic import step_calls

SIMULATED = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zbv")  # the simulator runs them all (W = B/2)
SIMULATOR_LIMIT = 256  # p·m·v above which the closed form stands in for the simulator (it is slow)
# Of the shorter of two overlapped streams, the share still paid: they contend for SMs, memory
# bandwidth and the link (a global constant, chosen on Narayanan et al. 2021's ZeRO-3 rows as a
# whole: 0 makes them 24-72% too fast, 1 makes them 10-28% too slow).
OVERLAP_LOSS = 0.5


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
    tp, cp, dp = strategy.tp, strategy.cp, strategy.dp
    return {"tp": 1, "cp": tp, "ep": tp, "dp": tp * cp, "pp": tp * cp * dp, "pp-ends": tp * cp * dp}


def _sizes(strategy):
    return {"tp": strategy.tp, "pp": strategy.pp, "dp": strategy.dp, "pp-ends": 2, "cp": strategy.cp,
            "ep": strategy.ep}


# ---- FLOPs ---------------------------------------------------------------------------------------

def layer_matrix_parameters(model):
    """Weights a token multiplies by in one layer (no biases, no norms): $12h²$ for GPT-2 shapes."""
    h = model.n_embd
    return h * (2 * h + 2 * model.kv_width) + model.ffn_matrices * h * model.hidden * model.top_k


def stage_forward_flops(model, strategy, stage):
    """FLOPs of one micro-batch's forward through this stage's pieces, on one tp rank:
    $2T·W/t + 4T·s·h/t$ per block, $W$ the layer's weights ($24·b·s·h²(1 + s/6h)/t$ for GPT-2), $2T·h·V/t$ the head."""
    tokens, s, h, t = strategy.micro_batch * model.block_size // strategy.cp, model.block_size, model.n_embd, \
        strategy.tp
    block = (2 * tokens * layer_matrix_parameters(model) + 4 * tokens * s * h) / t
    head = 2 * tokens * h * model.vocab_size / t
    return sum(block if piece == "block" else head if piece == "head" else 0.0
               for _, piece in rank_pieces(model, strategy, stage))


def flops_per_step(model, batch_size, recompute_forward=0.0):
    """Model FLOPs 3·B·s·(L·(2·weights + 4sh) + 2hV): Korthikanti et al. 2022's (appendix A)
    $72·B·L·s·h²(1 + s/6h + V/12hL)$ for GPT-2 shapes; plus ``recompute_forward`` × one more forward
    of the layers (1/3 of the layers' share for full recomputation, as Narayanan et al. count)."""
    s, h, L = model.block_size, model.n_embd, model.n_layer
    layers = L * (2 * layer_matrix_parameters(model) + 4 * s * h)
    return 3 * batch_size * s * (layers + 2 * h * model.vocab_size) + recompute_forward * batch_size * s * layers


def selective_recompute_flops(model, b, tp):
    """Selective recomputation reruns $QKᵀ$ and $P·V$ per layer: $4·b·s²·h/t$ FLOPs (Korthikanti et al. 2022)."""
    return 4 * b * model.block_size ** 2 * model.n_embd / tp


# ---- one micro-batch on one stage -----------------------------------------------------------------

def stage_compute(model, strategy, machine, stage):
    """{"forward", "backward", "recompute"} seconds of one micro-batch's kernels on ``stage``."""
    pieces = [piece for _, piece in rank_pieces(model, strategy, stage)]
    blocks = pieces.count("block")
    zero3_rerun = strategy.effective_zero == 3 and strategy.precision == "fp32"  # minipar reruns each piece
    if machine.is_gpu_profile:
        # fp32 on a GPU: TF32 tensor cores at half the 16-bit peak (A100 156 of 312, H100 494 of 989
        # TFLOP/s, the data sheets), and twice the bytes for the memory-bound kernels: every kernel x2
        scale = 2.0 if strategy.precision == "fp32" else 1.0
        layer = layer_compute_times(model, strategy, machine, machine.fused_attention)
        head = head_compute_times(model, strategy, machine) if "head" in pieces else {"forward": 0.0, "backward": 0.0}
        forward = scale * (blocks * layer["forward"] + head["forward"])
        recompute = scale * blocks * layer["recompute"] + (forward if zero3_rerun else 0.0)
        backward = scale * (blocks * layer["backward"] + head["backward"])
        return {"forward": forward, "backward": backward, "recompute": recompute}
    reruns = int(strategy.recompute == "full") + int(zero3_rerun)
    if machine.gemm_table:  # calibrated per GEMM shape class (kernels.py)
        layer = cpu_layer_times(model, strategy, machine)
        head = cpu_head_times(model, strategy, machine) if "head" in pieces else {"forward": 0.0, "backward": 0.0}
        forward = blocks * layer["forward"] + head["forward"]
        recompute = reruns * forward + (blocks * layer["attention"] if strategy.recompute == "selective" else 0.0)
        return {"forward": forward, "backward": blocks * layer["backward"] + head["backward"], "recompute": recompute}
    t_f = stage_forward_flops(model, strategy, stage) / machine.flops + machine.overhead_per_block * blocks / 3
    recompute = reruns * t_f
    if strategy.recompute == "selective":
        recompute += selective_recompute_flops(model, strategy.micro_batch, strategy.tp) * blocks / machine.flops
    return {"forward": t_f, "backward": 2 * t_f, "recompute": recompute}


def stage_communication(model, strategy, machine, stage):
    """Seconds per step of each group's calls: {"tp", "pp", "dp", "dp_micro"} (dp_micro: ZeRO-3's gathers)."""
    strides, sizes = _strides(strategy), _sizes(strategy)
    comm = {"tp": 0.0, "pp": 0.0, "dp": 0.0, "dp_micro": 0.0}
    merged = {}  # the same call many times (ZeRO's units of equal size): timed once
    for call in step_calls(model, strategy, stage):
        key = call.__class__(call.group, call.kind, call.elements, call.itemsize, 1, call.per)
        merged[key] = merged.get(key, 0) + call.count
    for key, count in merged.items():
        call = key.__class__(key.group, key.kind, key.elements, key.itemsize, count, key.per)
        size = sizes[call.group] * (strategy.cp if call.group == "dp" else 1)  # gradients reduce over dp·cp
        nbytes = call.elements * call.itemsize
        seconds = 0.0
        if call.group == "pp" and call.kind == "send" and strategy.precision != "fp32" and strategy.tp > 1:
            # scatter/gather: each tp rank sends its 1/t across nodes, the receivers all-gather it
            seconds = call.count * machine.collective_time("allgather", nbytes, strategy.tp, 1)
            nbytes //= strategy.tp
        seconds += call.count * machine.collective_time(call.kind, nbytes, size, strides[call.group])
        group = {"pp-ends": "pp", "cp": "tp", "ep": "tp"}.get(call.group, call.group)
        if group == "dp" and call.per == "microbatch":
            group = "dp_micro"
        comm[group] += seconds
    return comm


def stage_time(model, strategy, machine, stage, overlap):
    """Seconds for the stage: {"forward", "backward", "recompute", "tp", "pp", "dp", "dp_hidden",
    "optimizer", "micro"} (micro = T_mb; tp, pp and dp per step)."""
    m, engine = strategy.microbatches, strategy.engine
    compute = stage_compute(model, strategy, machine, stage)
    comm = stage_communication(model, strategy, machine, stage)
    work = compute["forward"] + compute["backward"] + compute["recompute"]
    gathers = comm["dp_micro"] / m
    if engine == "ideal" and gathers:  # prefetched gathers beside the micro-batch's compute
        per_micro = max(work, gathers) + OVERLAP_LOSS * min(work, gathers)
    else:
        per_micro = work + gathers
    micro = per_micro + (comm["tp"] + comm["pp"]) / m
    dp, zero = comm["dp"], strategy.effective_zero
    backward = compute["backward"] + compute["recompute"]
    if engine == "ideal":
        hidden = dp - max(0.0, dp - backward) - OVERLAP_LOSS * min(dp, backward)
    elif overlap:
        hidden = min(dp, backward * (m if zero >= 2 else 1))
    else:
        hidden = 0.0
    return dict(compute, tp=comm["tp"], pp=comm["pp"], dp=dp, dp_hidden=hidden, per_micro=per_micro, micro=micro,
                optimizer=2 * state_bytes(model, strategy, stage) / machine.memory_bandwidth)


@functools.lru_cache(maxsize=4096)
def _simulated_bubble(schedule, p, m, v, backward_ratio):
    """Bubble of ``schedule`` in units of one micro-batch's F + B, from the simulator."""
    from minipar.parallel.pipeline.schedules import build_all_schedules
    from minipar.parallel.pipeline.simulator import simulate

    result = simulate(build_all_schedules(schedule, p, m, v), 1.0 / v, backward_ratio / v)
    return result.makespan / (1 + backward_ratio) - m


def pipeline_bubble(strategy, forward, backward):
    """Seconds the slowest stage idles per step, for one micro-batch's ``forward`` and ``backward``
    (backward includes recomputation); module docstring."""
    p, m, v, schedule = strategy.pp, strategy.microbatches, strategy.virtual_stages, strategy.schedule
    if p == 1:
        return 0.0
    if schedule in SIMULATED and p * m * v <= SIMULATOR_LIMIT:
        ratio = round(backward / forward, 1) if forward else 2.0
        return _simulated_bubble(schedule, p, m, v, ratio) * (forward + backward)
    if not schedule.startswith("zb"):
        return (p - 1) / v * (forward + backward)
    # Beyond the simulator's size: Qi et al. 2023's bubbles with B_in = W = backward/2, plus the
    # start/end skew a synchronous optimizer step waits for (minipar has no post-validation).
    b_input = weight = backward / 2
    if schedule == "zb-h1":
        return (p - 1) * (forward + b_input - weight)
    skew = (p - 1) * forward * (0.5 if schedule == "zbv" else 1.0)
    return (p - 1) * max(0.0, forward + b_input - 2 * weight) + skew  # zb-h2, zbv


def step_time(model, strategy, machine, overlap=False):
    """The step's seconds and their breakdown, from the slowest stage (module docstring)."""
    stages = [stage_time(model, strategy, machine, stage, overlap) for stage in representative_stages(strategy)]
    slow = max(stages, key=lambda t: t["micro"])
    m = strategy.microbatches
    compute_share = slow["per_micro"] / slow["micro"] if slow["micro"] else 1.0
    bubble = pipeline_bubble(strategy, slow["forward"] * slow["micro"] / slow["per_micro"] * compute_share,
                             (slow["backward"] + slow["recompute"]) * slow["micro"] / slow["per_micro"]) \
        if slow["per_micro"] else 0.0
    worst_dp = max(stages, key=lambda t: t["dp"] - t["dp_hidden"] + t["optimizer"])
    time = {"compute": m * slow["per_micro"], "bubble": bubble, "tp": slow["tp"], "pp": slow["pp"],
            "dp": worst_dp["dp"] - worst_dp["dp_hidden"], "optimizer": worst_dp["optimizer"]}
    time["step"] = m * slow["micro"] + bubble + time["dp"] + time["optimizer"]
    return time


def predict(model, strategy, machine, overlap=False, headroom=None, timed=True):
    """Memory of the fullest stage, the step's time, and whether it fits (``headroom``: memory.Headroom).
    ``timed=False`` skips the time (None) for a layout that does not fit: the search's first pass."""
    memory_by_stage = [memory_per_rank(model, strategy, stage, headroom) for stage in representative_stages(strategy)]
    memory = max(memory_by_stage, key=lambda mem: mem["total"])
    fits = memory["total"] <= machine.memory_bytes
    time = step_time(model, strategy, machine, overlap) if timed or fits else None
    return Prediction(strategy, memory, memory_by_stage, time, fits)


def mfu(model, prediction, machine):
    """Model FLOPs utilisation: model FLOPs / (step time · ranks · peak), Korthikanti et al. 2022."""
    peak = machine.peak or machine.flops
    return flops_per_step(model, prediction.strategy.batch_size) / (prediction.step * machine.gpus * peak)
