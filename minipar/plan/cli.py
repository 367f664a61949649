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
chart of memory per rank by component (those words and figures: minipar/plan/report.py).
"""
import argparse

from minipar.errors import ConfigError
from minipar.plan.hardware import load_machine, named_machine
from minipar.plan.memory import Headroom
from minipar.plan.model import PRESETS, ModelSpec
from minipar.plan.report import (
    GB,
    count,
    describe_model,
    explain,
    no_layout_message,
    nothing_fits_message,
    plot_memory,
    size,
    table,
    training_summary,
)
from minipar.plan.search import rank_layouts
from minipar.plan.strategy import ENGINES, SCHEDULES

DEFAULT_BATCH = {"gpt2-small": 512, "gpt3-175b": 1536, "megatron-1.7b": 512, "megatron-3.6b": 512,
                 "megatron-7.5b": 512, "megatron-18b": 1024, "megatron-39b": 1536, "megatron-76b": 1792,
                 "megatron-145b": 2304, "megatron-310b": 2160, "megatron-530b": 2520, "megatron-1t": 3072,
                 "kor-22b": 4, "zero-7.5b": 512, "llama2-7b": 1024, "llama2-70b": 1024, "llama3-8b": 512,
                 "llama3-70b": 512}  # the papers' batches; Llama: 4M tokens (Touvron et al. 2023)


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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minipar plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
