"""``python -m minipar plan``: which layout for this model on this machine, and why.

    python -m minipar plan --preset gpt3-175b --gpus 1024 --gpus-per-node 8 --gpu-memory 80
    python -m minipar plan --n-layer 8 --n-embd 128 --n-head 8 --block-size 64 --vocab 64 \\
        --batch-size 16 --gpus 8 --machine out/calibration.json --precision fp32 --explain

Enumerates every dp × tp × pp of --gpus (tp inside a node), micro-batch counts, ZeRO stages,
sequence parallelism and recomputation; drops what does not fit in memory; ranks the rest by
predicted step time; prints the top ones with their memory and time breakdown, optionally a
plain-words explanation of the best and a bar chart of memory per rank.
"""
import argparse
import math

from minipar.errors import ConfigError
from minipar.plan.cost import flops_per_step, rank_layouts
from minipar.plan.hardware import load_machine, named_machine
from minipar.plan.model import PRESETS, ModelSpec

DEFAULT_BATCH = {"gpt2-small": 512, "gpt3-175b": 1536, "megatron-1.7b": 512, "megatron-18b": 1024,
                 "megatron-76b": 1792, "megatron-145b": 2304, "megatron-310b": 2160, "megatron-530b": 2520,
                 "megatron-1t": 3072, "zero-7.5b": 512}
GB = 1e9


def add_arguments(parser):
    model = parser.add_argument_group("model: a preset, or its shape")
    model.add_argument("--preset", choices=sorted(PRESETS))
    for name in ("n-layer", "n-embd", "n-head", "block-size", "vocab"):
        model.add_argument(f"--{name}", type=int)
    machine = parser.add_argument_group("machine")
    machine.add_argument("--gpus", type=int, required=True, help="ranks in all")
    machine.add_argument("--gpus-per-node", type=int, default=8)
    machine.add_argument("--gpu-memory", type=float, default=None, help="GB per rank (default: the profile's)")
    machine.add_argument("--machine", default="a100", help="a100 | h100 | a calibration JSON from `calibrate`")
    plan = parser.add_argument_group("search")
    plan.add_argument("--batch-size", type=int, default=None, help="global batch in sequences")
    plan.add_argument("--precision", choices=["mixed", "fp32"], default=None,
                      help="mixed: the papers' GPU runs (16-bit, Adam's 16 bytes/param); "
                           "fp32: minipar (the default with a calibration file)")
    plan.add_argument("--zero", default="0,1,2,3", help="ZeRO stages to consider")
    plan.add_argument("--recompute", default="none,selective,full", help="recomputation to consider")
    plan.add_argument("--sequence-parallel", choices=["both", "off"], default="both",
                      help="consider sequence parallelism (both) or not (off, as in Narayanan et al. 2021)")
    plan.add_argument("--no-overlap", action="store_true", help="no overlap of the dp gradient sync with backward")
    plan.add_argument("--top", type=int, default=8)
    plan.add_argument("--explain", action="store_true", help="say in plain words why the best layout wins")
    plan.add_argument("--plot", default=None, help="write a bar chart of memory per rank (PNG) here")


def model_from(arguments):
    shape = [arguments.n_layer, arguments.n_embd, arguments.n_head, arguments.block_size, arguments.vocab]
    if arguments.preset:
        if any(value is not None for value in shape):
            raise ConfigError("give either --preset or the model's shape (--n-layer ...), not both")
        return PRESETS[arguments.preset]
    if any(value is None for value in shape):
        raise ConfigError("give --preset NAME or all of --n-layer --n-embd --n-head --block-size --vocab")
    return ModelSpec(*shape)


def machine_from(arguments):
    if arguments.machine.endswith(".json"):
        return load_machine(arguments.machine, arguments.gpus, arguments.gpu_memory), "fp32"
    machine = named_machine(arguments.machine, arguments.gpus, arguments.gpus_per_node, arguments.gpu_memory)
    return machine, "mixed"


def options_from(arguments, precision):
    zero = tuple(int(z) for z in arguments.zero.split(","))
    if any(z not in (0, 1, 2, 3) for z in zero):
        raise ConfigError(f"--zero takes stages among 0,1,2,3, got {arguments.zero!r}")
    recompute = tuple("" if r == "none" else r for r in arguments.recompute.split(","))
    if any(r not in ("", "selective", "full") for r in recompute):
        raise ConfigError(f"--recompute takes none,selective,full, got {arguments.recompute!r}")
    if precision == "fp32":
        recompute = tuple(r for r in recompute if r != "selective") or ("",)
    sequence_parallel = (False, True) if arguments.sequence_parallel == "both" else (False,)
    return {"zero": zero, "sp": sequence_parallel, "recompute": recompute, "precision": precision}


def run(arguments):
    model = model_from(arguments)
    machine, default_precision = machine_from(arguments)
    precision = arguments.precision or default_precision
    batch = arguments.batch_size or DEFAULT_BATCH.get(model.name, 8 * arguments.gpus)
    fitting, everything = rank_layouts(model, machine, batch, options_from(arguments, precision),
                                       overlap=not arguments.no_overlap)
    print(f"{model.name}: {model.parameters / 1e9:.2f} B parameters (L={model.n_layer}, h={model.n_embd}, "
          f"a={model.n_head}, s={model.block_size}, V={model.vocab_size}); global batch {batch}; "
          f"{machine.gpus} x {machine.name} ({machine.memory_bytes / GB:.0f} GB, {machine.gpus_per_node} per node); "
          f"{precision} precision")
    if not everything:
        raise ConfigError(no_layout_message(model, machine, batch))
    if not fitting:
        raise ConfigError(nothing_fits_message(everything, machine))
    print(f"{len(everything)} layouts considered, {len(fitting)} fit; the fastest {min(arguments.top, len(fitting))}:")
    print(table(fitting[:arguments.top], model, machine))
    if arguments.explain:
        print()
        print(explain(fitting, everything, model, machine))
    if arguments.plot:
        plot_memory(fitting[:arguments.top], machine, arguments.plot)
        print(f"\nmemory per rank: {arguments.plot}")
    return 0


def table(predictions, model, machine):
    head = ("| # | layout | params+grads+opt GB | activations GB | total GB | step s | compute | bubble | "
            "tp comm | pp comm | dp comm (exposed) | optimizer | TFLOP/s per GPU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for number, p in enumerate(predictions, start=1):
        mem, t = p.memory, p.time
        states = mem["parameters"] + mem["gradients"] + mem["optimizer_states"]
        tflops = flops_per_step(model, p.strategy.batch_size) / t["step"] / machine.gpus / 1e12
        lines.append(f"| {number} | {p.strategy.describe()} | {states / GB:.1f} | {mem['activations'] / GB:.1f} | "
                     f"{mem['total'] / GB:.1f} | {t['step']:.3g} | {t['compute']:.3g} | {t['bubble']:.3g} | "
                     f"{t['tp']:.3g} | {t['pp']:.3g} | {t['dp']:.3g} | {t['optimizer']:.3g} | {tflops:.0f} |")
    return "\n".join(lines)


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
    return (f"nothing fits in {machine.memory_bytes / GB:.0f} GB per GPU: the leanest layout "
            f"({smallest.strategy.describe()}) needs {need:.1f} GB per rank; it would fit with --gpu-memory "
            f"{math.ceil(need)}, or try about --gpus {more} (model states shrink as 1/(tp·pp), and 1/dp with ZeRO-3)")


def explain(fitting, everything, model, machine):
    """The best layout in plain words, with the numbers that decided it."""
    best = fitting[0]
    s, t, mem = best.strategy, best.time, best.memory
    words = [f"Best: {s.describe()}, {t['step']:.3g} s per step, {mem['total'] / GB:.1f} GB on the fullest rank."]
    words.append(f"- Tensor parallelism {s.tp}: its collectives run inside every layer, forward and backward "
                 f"({t['tp']:.3g} s of the step here), so it stays inside one node of {machine.gpus_per_node} GPUs, "
                 f"on NVLink; across nodes the same bytes would crawl over InfiniBand.")
    if s.pp > 1:
        words.append(f"- Pipeline parallelism {s.pp}: stages exchange only one activation per micro-batch "
                     f"({t['pp']:.3g} s), so they can sit on different nodes; the price is the bubble, "
                     f"(p-1)/(m+p-1) = {(s.pp - 1) / (s.microbatches + s.pp - 1):.1%} of the pipeline with m = "
                     f"{s.microbatches} micro-batches ({t['bubble']:.3g} s).")
    else:
        words.append("- No pipeline: once tensor parallelism and ZeRO have cut the model states, every rank holds "
                     "all layers, and there is no bubble to pay.")
    words.append(f"- Data parallelism {s.dp}: one gradient sync per step; {t['dp']:.3g} s of it is left exposed "
                 f"after overlapping with the last backward.")
    if s.effective_zero:
        plain = next((p for p in everything if p.strategy.with_(zero=0) == s), None)
        if plain is not None:
            words.append(f"- ZeRO-{s.zero} shards the model states over the {s.dp} replicas: "
                         f"{_states(plain.memory) / GB:.1f} GB -> {_states(mem) / GB:.1f} GB per rank.")
    else:
        words.append("- No ZeRO: the replicas have room for their full optimizer state, and ZeRO-3 would add "
                     "parameter gathers to every micro-batch.")
    if s.recompute or s.sequence_parallel:
        used = (["sequence parallelism"] if s.sequence_parallel else []) + \
            ([f"{s.recompute} recomputation"] if s.recompute else [])
        words.append(f"- Activations: {mem['activations'] / GB:.1f} GB per rank with {' and '.join(used)} "
                     f"(Korthikanti et al. 2022), which is what lets this layout fit.")
    rejected = [p for p in everything if not p.fits]
    if rejected:
        fastest_rejected = min(rejected, key=lambda p: p.step)
        words.append(f"- {len(rejected)} layouts do not fit; the fastest of them "
                     f"({fastest_rejected.strategy.describe()}, "
                     f"{fastest_rejected.step:.3g} s) needs {fastest_rejected.memory['total'] / GB:.0f} GB per rank.")
    return "\n".join(words)


def _states(memory):
    return memory["parameters"] + memory["gradients"] + memory["optimizer_states"]


def plot_memory(predictions, machine, path):
    """Stacked bars: each layout's fullest rank, by kind of memory, against the GPU's capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ("parameters", "gradients", "optimizer_states", "activations", "buffers")
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(predictions)), 4.5))
    labels = [p.strategy.describe().replace(" ", "\n", 3) for p in predictions]
    bottom = [0.0] * len(predictions)
    for kind in kinds:
        heights = [p.memory.get(kind, 0) / GB for p in predictions]
        axes.bar(labels, heights, bottom=bottom, label=kind.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.axhline(machine.memory_bytes / GB, color="black", linestyle="--", label="GPU memory")
    axes.set_ylabel("GB on the fullest rank")
    axes.set_title("memory per rank of the fastest layouts")
    axes.legend(fontsize=8)
    axes.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minipar plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
