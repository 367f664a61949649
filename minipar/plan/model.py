"""What a layout is and which pieces and parameters it puts on each rank: the model, the strategy.

Symbols (as in /docs/planning.md): L layers, h = n_embd, a heads, s sequence length, V vocabulary,
b micro-batch rows, t tensor-parallel ranks, p pipeline stages, v chunks per stage, m micro-batches,
N_d data-parallel ranks, Ψ parameters on a rank, e bytes per element.

A ModelSpec is a GPT's shapes; its Ψ is 12Lh² + 13Lh (blocks) + Vh + sh (embeddings) + 2h (final
norm). A Strategy is the dp × tp × pp grid, the batch split into m micro-batches of b rows, the
schedule and the memory options; ``check_strategy`` refuses what the Trainer refuses. The L layers
are cut into pv chunks of floor(L/(pv)) layers, one more for the first L mod pv (``chunk_layers``,
as ``partition`` splits them), and stage r runs the chunks c with c mod p = r (``rank_chunks``):
chunk 0 carries the embedding, chunk pv − 1 the head. ``rank_parameters`` lists each parameter
(each a tensor-parallel shard) a stage holds, the tied weight once, the same list in the same
order as the Trainer's ``stage_parameters``; ``zero_units`` groups it as ZeRO does
(parallel/zero.py), each parameter cut into N_d parts of ceil(n/N_d) elements (``part_length``).

What these cost in bytes (parameters, gradients, optimizer state, activations, buffers):
minipar/plan/memory.py; in time: minipar/plan/cost.py.
"""
import functools
import math
from dataclasses import dataclass, replace

from minipar.errors import ConfigError, require_positive_int


@dataclass(frozen=True)
class ModelSpec:
    """A GPT as the planner sees it (the same shapes as ``minipar.nn.gpt.GPTConfig``)."""

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    name: str = "custom"

    def __post_init__(self):
        for field in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size"):
            require_positive_int(field, getattr(self, field))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def parameters(self):
        """Ψ of the whole model: 12Lh² + 13Lh (blocks) + Vh + sh (embeddings) + 2h (final norm)."""
        h = self.n_embd
        return self.n_layer * (12 * h * h + 13 * h) + (self.vocab_size + self.block_size) * h + 2 * h

    @classmethod
    def from_gpt_config(cls, config, name="custom"):
        return cls(config.n_layer, config.n_embd, config.n_head, config.block_size, config.vocab_size, name)


# GPT-2 small: Radford et al. 2019 (117M in the paper; 124M counted with tied embeddings).
# GPT-3 175B: Brown et al. 2020, Table 2.1 (96 layers, d_model 12288, 96 heads, context 2048).
# The others: Narayanan et al. 2021, Table 1 (heads, hidden size, layers; s = 2048, V = 51,200).
PRESETS = {
    "gpt2-small": ModelSpec(12, 768, 12, 1024, 50304, "gpt2-small"),
    "gpt3-175b": ModelSpec(96, 12288, 96, 2048, 51200, "gpt3-175b"),
    "megatron-1.7b": ModelSpec(24, 2304, 24, 2048, 51200, "megatron-1.7b"),
    "megatron-18b": ModelSpec(40, 6144, 48, 2048, 51200, "megatron-18b"),
    "megatron-76b": ModelSpec(60, 10240, 80, 2048, 51200, "megatron-76b"),
    "megatron-145b": ModelSpec(80, 12288, 96, 2048, 51200, "megatron-145b"),
    "megatron-310b": ModelSpec(96, 16384, 128, 2048, 51200, "megatron-310b"),
    "megatron-530b": ModelSpec(105, 20480, 128, 2048, 51200, "megatron-530b"),
    "megatron-1t": ModelSpec(128, 25600, 160, 2048, 51200, "megatron-1t"),
    # ZeRO's 7.5B example (Rajbhandari et al. 2020, section 3.1: Ψ = 7.5B); the shape is ours.
    "zero-7.5b": ModelSpec(40, 3840, 40, 1024, 51200, "zero-7.5b"),
}


@dataclass(frozen=True)
class Strategy:
    """One layout of a training step: the grid, the batch split and the memory options."""

    dp: int
    tp: int
    pp: int
    batch_size: int  # global batch, sequences
    microbatches: int = 1  # per replica and step
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    recompute: str = ""  # "" | "full" (minipar: the chunk's forward reruns before its backward) | "selective"
    precision: str = "fp32"  # "fp32": minipar's engine, counted to the byte; "mixed": the papers' GPU runs
    bucket_bytes: int = 1 << 20

    @property
    def dtype_bytes(self):
        """Bytes per activation, gradient and message element: 4 (fp32), 2 (fp16/bf16 mixed precision)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def world(self):
        return self.dp * self.tp * self.pp

    @property
    def micro_batch(self):
        return self.batch_size // (self.dp * self.microbatches)

    @property
    def chunks(self):
        return self.pp * self.virtual_stages

    @property
    def effective_zero(self):
        return self.zero if self.dp > 1 else 0  # the Trainer ignores ZeRO with one replica

    def describe(self):
        interleaving = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        extras = [f"m={self.microbatches}", self.schedule + interleaving]
        extras += [f"ZeRO-{self.zero}"] if self.effective_zero else []
        extras += ["SP"] if self.sequence_parallel else []
        extras += [f"recompute-{self.recompute}"] if self.recompute else []
        return f"dp{self.dp} tp{self.tp} pp{self.pp} " + " ".join(extras)

    def with_(self, **changes):
        return replace(self, **changes)


def check_strategy(model, strategy):
    """A ConfigError saying what does not divide, or None; the same checks as the Trainer's."""
    s = strategy
    problems = []
    if s.batch_size % (s.dp * s.microbatches):
        problems.append(f"global batch {s.batch_size} is not divisible by dp x micro-batches = {s.dp * s.microbatches}")
    for what, value in (("n_head", model.n_head), ("4 * n_embd", 4 * model.n_embd), ("vocab_size", model.vocab_size)):
        if value % s.tp:
            problems.append(f"{what} ({value}) is not divisible by tp ({s.tp})")
    if s.sequence_parallel and model.block_size % s.tp:
        problems.append(f"sequence length {model.block_size} is not divisible by tp ({s.tp}) for sequence parallelism")
    if model.n_layer < s.chunks:
        problems.append(f"{model.n_layer} layers cannot fill {s.chunks} pipeline chunks")
    if s.recompute == "selective" and s.precision == "fp32":
        problems.append("minipar recomputes whole pipeline chunks (full); selective recomputation is planned "
                        "only for mixed precision (--precision mixed)")
    if s.virtual_stages > 1 and (s.schedule != "interleaved" or model.n_layer % s.chunks or s.microbatches % s.pp):
        problems.append("interleaving needs the interleaved schedule, L a multiple of p·v and m a multiple of p")
    return ConfigError("; ".join(problems)) if problems else None


def chunk_layers(model, strategy):
    """Layers per chunk, as ``partition`` splits them: floor(L/(pv)), one more for the first L mod pv."""
    base, extra = divmod(model.n_layer, strategy.chunks)
    return [base + (1 if c < extra else 0) for c in range(strategy.chunks)]


def rank_chunks(strategy, stage):
    """The global chunk numbers stage ``stage`` runs: c with c mod p = stage (round robin)."""
    return [c for c in range(strategy.chunks) if c % strategy.pp == stage]


def representative_stages(strategy):
    """Stages that can be the fullest or the slowest: the first (most layers, most in flight, the
    embedding) and the last (the head); the middle ones hold no more than the first."""
    return sorted({0, strategy.pp - 1})


# ---- parameters ----------------------------------------------------------------------------------

def block_parameters(model, tp):
    """(name, elements) of one block's tensor-parallel shard, in ``named_parameters`` order."""
    h = model.n_embd
    norm = [("norm.weight", h), ("norm.bias", h)]
    return (norm + [("qkv.weight", h * 3 * h // tp), ("qkv.bias", 3 * h // tp),
                    ("attention.output.weight", h * h // tp), ("attention.output.bias", h)]
            + norm + [("hidden.weight", h * 4 * h // tp), ("hidden.bias", 4 * h // tp),
                      ("mlp.output.weight", 4 * h * h // tp), ("mlp.output.bias", h)])


def piece_parameters(model, piece, tp):
    """(name, elements) of a piece: "embedding", "block" or "head" (whose first is the tied weight)."""
    h = model.n_embd
    token = ("embedding.token.weight", model.vocab_size // tp * h)
    if piece == "embedding":
        return [token, ("embedding.position.weight", model.block_size * h)]
    if piece == "head":
        return [token, ("head.norm.weight", h), ("head.norm.bias", h)]
    return block_parameters(model, tp)


@functools.lru_cache(maxsize=4096)
def rank_pieces(model, strategy, stage):
    """[(chunk, piece name)] on this stage, in order: embedding, blocks..., head."""
    layers = chunk_layers(model, strategy)
    pieces = []
    for c in rank_chunks(strategy, stage):
        pieces += [(c, "embedding")] if c == 0 else []
        pieces += [(c, "block")] * layers[c]
        pieces += [(c, "head")] if c == strategy.chunks - 1 else []
    return pieces


@functools.lru_cache(maxsize=4096)
def rank_parameters(model, strategy, stage):
    """[(piece index, name, elements)] held on ``stage``, each parameter once (the tied weight once)."""
    out, seen_token = [], False
    for index, (_, piece) in enumerate(rank_pieces(model, strategy, stage)):
        for name, n in piece_parameters(model, piece, strategy.tp):
            if name == "embedding.token.weight":
                if seen_token:
                    continue
                seen_token = True
            out.append((index, name, n))
    return out


@functools.lru_cache(maxsize=4096)
def zero_named_units(model, strategy, stage):
    """ZeRO's units (parallel/zero.py ``make_units``): per piece its own parameters, and the tied
    weight alone when two pieces of this rank use it. Returns [(piece indices using it, [(name, elements)])]."""
    pieces = rank_pieces(model, strategy, stage)
    shared = sum(piece in ("embedding", "head") for _, piece in pieces) == 2
    units, tied = [], None
    for index, (_, piece) in enumerate(pieces):
        own = [(name, n) for name, n in piece_parameters(model, piece, strategy.tp)
               if not (shared and name == "embedding.token.weight")]
        units.append(([index], own))
        if shared and piece in ("embedding", "head"):
            if tied is None:
                tied = ([], [("embedding.token.weight", model.vocab_size // strategy.tp * model.n_embd)])
                units.append(tied)
            tied[0].append(index)
    return units


def zero_units(model, strategy, stage):
    """``zero_named_units`` with the elements only: [(piece indices, [elements])]."""
    return [(users, [n for _, n in unit]) for users, unit in zero_named_units(model, strategy, stage)]


def part_length(n, count):
    return -(-n // count)


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def ceil_div(a, b):
    return math.ceil(a / b)
