"""What ``python -m minipar plan`` prints: the ranked table, the time to train, the plain-words
explanation of the best layout, the messages when nothing fits, and the memory bar chart.

Numbers in the unit that fits (``size``, ``seconds``, ``rate``, ``count``); the search and the
predictions themselves are in search.py and cost.py, the command line in cli.py.
"""
import math

from minipar.plan.cost import flops_per_step, mfu

GB = 1e9


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
