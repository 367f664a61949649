"""``python -m minipar plan``: which layout for this model on this machine, and why.

    python -m minipar plan --preset gpt3-175b --gpus 1024 --gpus-per-node 8 --gpu-memory 80 --explain
    python -m minipar plan --config path/to/config.json --gpus 64 --machine h100
    python -m minipar plan --n-layer 8 --n-embd 128 --n-head 8 --block-size 64 --vocab 64 \\
        --batch-size 16 --gpus 8 --machine out/calibration.json --explain

Enumerates every dp × tp × pp (× cp × ep) of --gpus (tp inside a node), the schedules, micro-batch
counts, ZeRO stages, sequence parallelism and recomputation (minipar/plan/search.py); drops what
does not fit in memory (with the headroom: framework, buffers, fragmentation); ranks the rest by
predicted step time; prints the top ones with their memory and time breakdown, the time to train
--tokens tokens, GPU-hours and MFU, optionally a plain-words explanation of the best and a bar
chart of memory per rank by component.
"""
import argparse
import math

from minipar.errors import ConfigError
from minipar.plan.cost import flops_per_step, mfu
from minipar.plan.hardware import load_machine, named_machine
from minipar.plan.memory import Headroom
from minipar.plan.model import PRESETS, ModelSpec
from minipar.plan.search import rank_layouts
from minipar.plan.strategy import ENGINES, SCHEDULES

DEFAULT_BATCH = {"gpt2-small": 512, "gpt3-175b": 1536, "megatron-1.7b": 512, "megatron-3.6b": 512,
                 "megatron-7.5b": 512, "megatron-18b": 1024, "megatron-39b": 1536, "megatron-76b": 1792,
                 "megatron-145b": 2304, "megatron-310b": 2160, "megatron-530b": 2520, "megatron-1t": 3072,
                 "kor-22b": 4, "zero-7.5b": 512, "llama2-7b": 1024, "llama2-70b": 1024, "llama3-8b": 512,
                 "llama3-70b": 512}  # the papers' batches; Llama: 4M tokens (Touvron et al. 2023)
GB = 1e9


def add_arguments(parser):
    model = parser.add_argument_group("model: a preset, a Hugging Face config.json, or its shape")
    model.add_argument("--preset", choices=sorted(PRESETS))
    model.add_argument("--config", help="a Hugging Face config.json (Llama, Mistral, Qwen2, Mixtral, GPT-2 keys)")
    for name in ("n-layer", "n-embd", "n-head", "block-size", "vocab"):
        model.add_argument(f"--{name}", type=int)
    model.add_argument("--experts", type=int, default=1, help="experts per MLP (with the shape flags)")
    model.add_argument("--top-k", type=int, default=1, help="experts each token goes to")
    machine = parser.add_argument_group("machine")
    machine.add_argument("--gpus", type=int, required=True, help="ranks in all")
    machine.add_argument("--gpus-per-node", type=int, default=8)
    machine.add_argument("--gpu-memory", type=float, default=None, help="GB per rank (default: the profile's)")
    machine.add_argument("--machine", default="a100", help="a100 | h100 | a calibration JSON from `calibrate`")
    machine.add_argument("--flash-attention", action="store_true", help="fused attention kernels (no s² traffic)")
    room = parser.add_argument_group("memory headroom (defaults: 2 GB, 0.5 GB, 5% on GPUs; 0.15 GB, 0, 0 on CPU)")
    room.add_argument("--framework-gb", type=float, help="the runtime's own memory per rank (CUDA, NCCL, Python)")
    room.add_argument("--buffers-gb", type=float, help="collective buffers beyond those counted by name")
    room.add_argument("--fragmentation", type=float, help="share of the tensors' bytes lost to the allocator")
    room.add_argument("--state-bytes", type=int, choices=[16, 18], default=16,
                      help="mixed precision: bytes of model state per parameter (18: Megatron's fp32 gradients)")
    plan = parser.add_argument_group("search")
    plan.add_argument("--batch-size", type=int, default=None, help="global batch in sequences")
    plan.add_argument("--precision", default=None,
                      help="fp32 (minipar's engine, counted to the byte; the default with a calibration file), "
                           "bf16 or fp16 (16-bit compute, 16 bytes of state per parameter; the GPU default); "
                           "a list such as fp32,bf16 searches both")
    plan.add_argument("--engine", choices=ENGINES, default="minipar",
                      help="minipar: what minipar does (ZeRO-2/3 reduce-scatter every micro-batch; with --overlap "
                           "ZeRO's collectives run during backward); ideal: the papers' engines, every overlap they can")
    plan.add_argument("--schedules", default=",".join(SCHEDULES), help="pipeline schedules to consider")
    plan.add_argument("--cp", default="1", help="context-parallel sizes to consider, e.g. 1,2,4")
    plan.add_argument("--zero", default="0,1,2,3", help="ZeRO stages to consider")
    plan.add_argument("--recompute", default="none,selective,full", help="recomputation to consider")
    plan.add_argument("--sequence-parallel", choices=["both", "off"], default="both",
                      help="consider sequence parallelism (both) or not (off, as in Narayanan et al. 2021)")
    plan.add_argument("--no-overlap", action="store_true", help="no overlap of the dp gradient sync with backward")
    plan.add_argument("--tokens", type=float, default=None,
                      help="tokens to train, for the time and GPU-hours (default: 300B on GPUs, 10M on CPU ranks)")
    plan.add_argument("--top", type=int, default=8)
    plan.add_argument("--explain", action="store_true", help="say in plain words why the best layout wins")
    plan.add_argument("--plot", default=None, help="write a bar chart of memory per rank by component (PNG) here")


def model_from(arguments):
    shape = [arguments.n_layer, arguments.n_embd, arguments.n_head, arguments.block_size, arguments.vocab]
    given = [arguments.preset is not None, arguments.config is not None, any(v is not None for v in shape)]
    if sum(given) > 1:
        raise ConfigError("give either --preset, --config or the model's shape (--n-layer ...), not two of them")
    if arguments.preset:
        return PRESETS[arguments.preset]
    if arguments.config:
        return ModelSpec.from_hf_config(arguments.config)
    if any(value is None for value in shape):
        raise ConfigError("give --preset NAME, --config FILE or all of --n-layer --n-embd --n-head --block-size --vocab")
    return ModelSpec(*shape, experts=arguments.experts, top_k=arguments.top_k)


def machine_from(arguments):
    if arguments.machine.endswith(".json"):
        return load_machine(arguments.machine, arguments.gpus, arguments.gpu_memory), "fp32"
    machine = named_machine(arguments.machine, arguments.gpus, arguments.gpus_per_node, arguments.gpu_memory,
                            arguments.flash_attention)
    return machine, "bf16"


def headroom_from(arguments, machine):
    default = Headroom.for_machine(machine)
    pick = {"framework": arguments.framework_gb, "buffers": arguments.buffers_gb}
    values = {key: default.__getattribute__(key) if value is None else value * GB for key, value in pick.items()}
    fragmentation = default.fragmentation if arguments.fragmentation is None else arguments.fragmentation
    if any(v < 0 for v in values.values()) or not 0 <= fragmentation < 1:
        raise ConfigError("headroom must be non-negative and --fragmentation in [0, 1)")
    return Headroom(values["framework"], values["buffers"], fragmentation)


def _split(text, allowed, what):
    values = tuple(v.strip() for v in text.split(","))
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ConfigError(f"{what} takes {','.join(allowed)}, got {text!r}")
    return values


def options_from(arguments, precision):
    zero = tuple(int(z) for z in _split(arguments.zero, ("0", "1", "2", "3"), "--zero"))
    recompute = tuple("" if r == "none" else r for r in
                      _split(arguments.recompute, ("none", "selective", "full"), "--recompute"))
    precisions = tuple("fp32" if p == "fp32" else "mixed"
                       for p in _split(precision, ("fp32", "bf16", "fp16", "mixed"), "--precision"))
    if precisions == ("fp32",):
        recompute = tuple(r for r in recompute if r != "selective") or ("",)
    try:
        cp = tuple(int(c) for c in arguments.cp.split(","))
    except ValueError:
        raise ConfigError(f"--cp takes sizes such as 1,2,4, got {arguments.cp!r}") from None
    sequence_parallel = (False, True) if arguments.sequence_parallel == "both" else (False,)
    return {"zero": zero, "sp": sequence_parallel, "recompute": recompute, "precision": tuple(dict.fromkeys(precisions)),
            "schedules": _split(arguments.schedules, SCHEDULES, "--schedules"), "cp": cp, "engine": arguments.engine,
            "state_bytes": arguments.state_bytes}


def run(arguments):
    model = model_from(arguments)
    machine, default_precision = machine_from(arguments)
    precision = arguments.precision or default_precision
    batch = arguments.batch_size or DEFAULT_BATCH.get(model.name, 8 * arguments.gpus)
    headroom = headroom_from(arguments, machine)
    fitting, everything = rank_layouts(model, machine, batch, options_from(arguments, precision),
                                       overlap=not arguments.no_overlap, headroom=headroom)
    print(f"{model.name}: {count(model.parameters)} parameters ({describe_model(model)}); global batch {batch}; "
          f"{machine.gpus} x {machine.name} ({size(machine.memory_bytes)}, {machine.gpus_per_node} per node); "
          f"{precision} precision; engine {arguments.engine}"
          + (" (the papers' overlap, not minipar's)" if arguments.engine == "ideal" else ""))
    if not everything:
        raise ConfigError(no_layout_message(model, machine, batch))
    if not fitting:
        raise ConfigError(nothing_fits_message(everything, machine))
    print(f"{len(everything)} layouts considered, {len(fitting)} fit; the fastest {min(arguments.top, len(fitting))}:")
    print(table(fitting[:arguments.top], model, machine))
    print()
    tokens = arguments.tokens or (300e9 if machine.device == "gpu" else 10e6)
    print(training_summary(fitting[0], model, machine, tokens))
    if arguments.explain:
        print()
        print(explain(fitting, everything, model, machine))
    if arguments.plot:
        plot_memory(fitting[:arguments.top], machine, arguments.plot)
        print(f"\nmemory per rank: {arguments.plot}")
    return 0


# ---- units that fit the size ----------------------------------------------------------------------

def size(nbytes):
    """Bytes in the unit that fits: 1.2 GB, 340 MB, 12 KB, 96 B (never 0.0 GB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def seconds(value):
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1), ("ms", 1e-3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value * 1e6:.3g} µs"


def rate(flops):
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP/s"


def count(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def describe_model(model):
    words = [f"L={model.n_layer}", f"h={model.n_embd}", f"a={model.n_head}"]
    words += [f"kv={model.kv_heads}"] if model.kv_heads != model.n_head else []
    words += [f"s={model.block_size}", f"V={model.vocab_size}"]
    words += [f"SwiGLU f={model.hidden}"] if model.ffn == "swiglu" else []
    words += ["RMSNorm"] if model.norm == "rmsnorm" else []
    words += ["untied"] if not model.tied else []
    words += [f"{model.experts} experts, top-{model.top_k}"] if model.experts > 1 else []
    return ", ".join(words)


def table(predictions, model, machine):
    head = ("| # | layout | params+grads+opt | activations | total | step | compute | bubble | tp/cp/ep comm | "
            f"pp comm | dp comm (exposed) | optimizer | per {_rank(machine)} | MFU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for number, p in enumerate(predictions, start=1):
        mem, t = p.memory, p.time
        states = mem["parameters"] + mem["gradients"] + mem["optimizer_states"]
        achieved = flops_per_step(model, p.strategy.batch_size) / t["step"] / machine.gpus
        label = p.strategy.describe() + (" fp32" if p.strategy.precision == "fp32" and machine.device == "gpu" else "")
        lines.append(f"| {number} | {label} | {size(states)} | {size(mem['activations'])} | "
                     f"{size(mem['total'])} | {seconds(t['step'])} | {seconds(t['compute'])} | {seconds(t['bubble'])} | "
                     f"{seconds(t['tp'])} | {seconds(t['pp'])} | {seconds(t['dp'])} | {seconds(t['optimizer'])} | "
                     f"{rate(achieved)} | {mfu(model, p, machine):.1%} |")
    return "\n".join(lines)


def training_summary(best, model, machine, tokens):
    steps = tokens / (best.strategy.batch_size * model.block_size)
    total = steps * best.step
    peak = "the data sheet's peak" if machine.device == "gpu" else "the FLOP/s calibrate measured on blocks"
    return (f"Training {tokens:.3g} tokens with the fastest: {steps:.3g} steps of {seconds(best.step)} = "
            f"{seconds(total)}, {total * machine.gpus / 3600:.3g} {_rank(machine)}-hours, MFU "
            f"{mfu(model, best, machine):.1%} (model FLOPs, Korthikanti et al. 2022, over {peak}, "
            f"{rate(machine.peak or machine.flops)} per {_rank(machine)}).")


def _rank(machine):
    return "GPU" if machine.device == "gpu" else "rank"


def no_layout_message(model, machine, batch):
    return (f"no layout of {machine.gpus} ranks can split this model: tp must divide n_head ({model.n_head}), "
            f"4*n_embd and the vocabulary ({model.vocab_size}) and fit in a node of {machine.gpus_per_node}, pp "
            f"must be at most n_layer ({model.n_layer}), dp must divide the batch ({batch}); try a number of "
            f"GPUs with more small factors, such as "
            f"{machine.gpus_per_node * max(1, machine.gpus // machine.gpus_per_node)}")


def nothing_fits_message(predictions, machine):
    smallest = min(predictions, key=lambda p: p.memory["total"])
    need = smallest.memory["total"] / GB
    # Model states shrink about as 1/GPUs (pp, tp, ZeRO-3), so scale the count by the shortfall.
    more = machine.gpus_per_node * 2 ** math.ceil(math.log2(max(1.0, machine.gpus * need * GB / machine.memory_bytes
                                                                     / machine.gpus_per_node)))
    return (f"nothing fits in {machine.memory_bytes / GB:.0f} GB per rank: the leanest layout "
            f"({smallest.strategy.describe()}) needs {need:.1f} GB per rank; it would fit with --gpu-memory "
            f"{math.ceil(need)}, or try about --gpus {more} (model states shrink as 1/(tp·pp), and 1/dp with ZeRO-3)")


def _links(machine):
    """How to speak of the links: NVLink and InfiniBand for GPU profiles, shared memory for CPU ranks."""
    if machine.device == "gpu":
        return (f"one node of {machine.gpus_per_node} GPUs, on NVLink", "across nodes the same bytes would crawl over "
                "InfiniBand", "different nodes")
    return ("this machine, where ranks talk through shared memory (measured by `calibrate`)",
            "every collective here costs what `calibrate` measured for its group size", "any ranks")


def explain(fitting, everything, model, machine):
    """The best layout in plain words, with the numbers that decided it."""
    best = fitting[0]
    s, t, mem = best.strategy, best.time, best.memory
    inside, across, where = _links(machine)
    words = [f"Best: {s.describe()}, {seconds(t['step'])} per step, {size(mem['total'])} on the fullest rank "
             f"(of {size(machine.memory_bytes)}; with {size(mem.get('framework', 0))} for the runtime, "
             f"{size(mem.get('fragmentation', 0))} for fragmentation)."]
    if s.tp > 1:
        words.append(f"- Tensor parallelism {s.tp}: its collectives run inside every layer, forward and backward "
                     f"({seconds(t['tp'])} of the step here), so it stays inside {inside}; {across}.")
    else:
        words.append("- No tensor parallelism: each rank's matrices stay whole, and no collective runs inside the "
                     "layers.")
    if s.pp > 1:
        words.append(f"- Pipeline parallelism {s.pp} ({s.schedule}"
                     + (f", v = {s.virtual_stages}" if s.virtual_stages > 1 else "") +
                     f"): stages exchange only one activation per micro-batch ({seconds(t['pp'])}), so they can sit "
                     f"on {where}; the price is the bubble, {seconds(t['bubble'])} of the step with m = "
                     f"{s.microbatches} micro-batches (from the pipeline simulator, or Qi et al. 2023's formulas for "
                     f"the zero-bubble schedules).")
    else:
        words.append("- No pipeline: once tensor parallelism and ZeRO have cut the model states, every rank holds "
                     "all layers, and there is no bubble to pay.")
    hidden = {"minipar": "minipar overlaps its buckets and ZeRO's reduce-scatters with backward under --overlap",
              "ideal": "assuming the papers' overlap"}[s.engine]
    words.append(f"- Data parallelism {s.dp}: {seconds(t['dp'])} of gradient sync left exposed ({hidden}).")
    if s.effective_zero:
        plain = next((p for p in everything if p.strategy == s.with_(zero=0)), None)
        if plain is not None:
            words.append(f"- ZeRO-{s.zero} shards the model states over the {s.dp} replicas: "
                         f"{size(_states(plain.memory))} -> {size(_states(mem))} per rank"
                         + (" (stage 1 holds whole gradients while micro-batches accumulate)"
                            if s.zero == 1 and s.microbatches > 1 else "") + ".")
    else:
        words.append("- No ZeRO: the replicas have room for their full optimizer state, and ZeRO-3 would add "
                     "parameter gathers to every micro-batch.")
    if s.recompute or s.sequence_parallel:
        used = (["sequence parallelism"] if s.sequence_parallel else []) + \
            ([f"{s.recompute} recomputation"] if s.recompute else [])
        words.append(f"- Activations: {size(mem['activations'])} per rank with {' and '.join(used)} "
                     f"(Korthikanti et al. 2022), which is what lets this layout fit.")
    rejected = [p for p in everything if not p.fits]
    if rejected:
        leanest = min(rejected, key=lambda p: p.memory["total"])
        words.append(f"- {len(rejected)} layouts do not fit; the leanest of them ({leanest.strategy.describe()}) "
                     f"needs {size(leanest.memory['total'])} per rank.")
    return "\n".join(words)


def _states(memory):
    return memory["parameters"] + memory["gradients"] + memory["optimizer_states"]


KINDS = ("parameters", "gradients", "optimizer_states", "activations", "buffers", "framework", "fragmentation")


def plot_memory(predictions, machine, path, axes=None):
    """Stacked bars: each layout's fullest rank, by component, against the rank's capacity. Draws on
    ``axes`` when given (the lesson's calculator), else writes a PNG to ``path``."""
    import matplotlib

    if axes is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max([p.memory["total"] for p in predictions] + [machine.memory_bytes])
    unit, scale = next((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1))
                       if largest >= 10 * f or f == 1)
    figure = None
    if axes is None:
        figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(predictions)), 4.5))
    labels = [p.strategy.describe().replace(" ", "\n", 3) for p in predictions]
    bottom = [0.0] * len(predictions)
    for kind in KINDS:
        heights = [p.memory.get(kind, 0) / scale for p in predictions]
        axes.bar(labels, heights, bottom=bottom, label=kind.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.axhline(machine.memory_bytes / scale, color="black", linestyle="--", label="memory per rank")
    axes.set_ylabel(f"{unit} on the fullest rank")
    axes.set_title("memory per rank, by component" if len(predictions) == 1 else
                   "memory per rank of the fastest layouts, by component")
    axes.legend(fontsize=7)
    axes.tick_params(axis="x", labelsize=7)
    if figure is not None:
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minipar plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
