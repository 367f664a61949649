"""What a layout is and which pieces and parameters it puts on each rank: the model, the strategy.

Symbols (as in /docs/planning.md): L layers, h = n_embd, a heads, s sequence length, V vocabulary,
b micro-batch rows, t tensor-parallel ranks, p pipeline stages, v chunks per stage, m micro-batches,
N_d data-parallel ranks, Ψ parameters on a rank, e bytes per element.

A ModelSpec is a decoder's shapes: minipar's GPT (Ψ = 12Lh² + 13Lh (blocks) + Vh + sh
(embeddings) + 2h (final norm)), or the Llama family's SwiGLU, GQA, RMSNorm, untied embeddings,
and experts; presets and Hugging Face config.json files make one. A Strategy is the dp × tp × pp
(× cp, ep) grid, the batch split into m micro-batches of b rows, the schedule, the memory options
and the engine; ``check_strategy`` refuses what the Trainer refuses. The L layers
are cut into pv chunks of floor(L/(pv)) layers, one more for the first L mod pv (``chunk_layers``,
as ``partition`` splits them), and stage r runs the chunks c with c mod p = r (``rank_chunks``):
chunk 0 carries the embedding, chunk pv − 1 the head. ``rank_parameters`` lists each parameter
(each a tensor-parallel shard) a stage holds, the tied weight once, the same list in the same
order as the Trainer's ``stage_parameters``; ``zero_units`` groups it as ZeRO does
(parallel/zero.py), each parameter cut into N_d parts of ceil(n/N_d) elements (``part_length``).

What these cost in bytes (parameters, gradients, optimizer state, activations, buffers):
minipar/plan/memory.py; in time: minipar/plan/cost.py and kernels.py; the search: search.py.
"""
import functools
import json
import math
from dataclasses import dataclass, replace

from minipar.errors import ConfigError, require_positive_int


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer as the planner sees it.

    The first five fields are minipar's GPT (``minipar.nn.gpt.GPTConfig``: LayerNorm with bias,
    GELU MLP of 4h, learned positions, tied embeddings, multi-head attention). The others
    describe the Llama family and friends (Touvron et al. 2023): ``ffn="swiglu"`` (three
    matrices h × f, Shazeer 2020), ``n_kv_head`` < ``n_head`` for grouped-query attention
    (Ainslie et al. 2023; 1 is multi-query, Shazeer 2019), ``norm="rmsnorm"`` (a weight, no
    bias; Zhang & Sennrich 2019), no biases, rotary positions (no table), an untied output
    layer; ``experts`` E > 1 replaces every MLP by E experts of which each token uses ``top_k``.
    """

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    name: str = "custom"
    ffn: str = "gelu"  # gelu: two matrices h × 4h; swiglu: gate, up (h × f) and down (f × h)
    ffn_hidden: int = 0  # f; 0 means 4h (gelu)
    n_kv_head: int = 0  # heads of K and V; 0 means n_head (multi-head attention)
    norm: str = "layernorm"  # layernorm (weight and bias) | rmsnorm (weight)
    bias: bool = True  # biases in the linear layers (GPT-2: yes; Llama: no)
    learned_positions: bool = True  # a (block_size × h) position table (GPT-2) or rotary (none)
    tied: bool = True  # the output layer reuses the token embedding
    experts: int = 1  # E experts per MLP (mixture of experts); 1 = dense
    top_k: int = 1  # experts each token is sent to

    def __post_init__(self):
        for field in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size", "experts", "top_k"):
            require_positive_int(field, getattr(self, field))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise ConfigError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.ffn not in ("gelu", "swiglu") or self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"ffn must be gelu or swiglu and norm layernorm or rmsnorm, got {self.ffn}, {self.norm}")
        if self.top_k > self.experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed the number of experts ({self.experts})")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def kv_width(self):
        """Width of K (and of V): kv_heads · h/a."""
        return self.kv_heads * self.head_dim

    @property
    def hidden(self):
        """f, the MLP's inner width."""
        return self.ffn_hidden or 4 * self.n_embd

    @property
    def ffn_matrices(self):
        return 3 if self.ffn == "swiglu" else 2

    @property
    def is_gpt2(self):
        """minipar's own GPT: what the engine runs (the byte-exact accounting applies)."""
        return (self.ffn == "gelu" and self.hidden == 4 * self.n_embd and self.kv_heads == self.n_head
                and self.norm == "layernorm" and self.bias and self.learned_positions and self.tied
                and self.experts == 1)

    @property
    def parameters(self):
        """Ψ of the whole model: blocks, embeddings, final norm (and the output layer if untied).

        GPT-2 shapes: 12Lh² + 13Lh + Vh + sh + 2h (the sum of ``block_parameters``)."""
        blocks = self.n_layer * sum(n for _, n in block_parameters(self, 1))
        embeddings = self.vocab_size * self.n_embd * (1 if self.tied else 2)
        positions = self.block_size * self.n_embd if self.learned_positions else 0
        norm = self.n_embd * (2 if self.norm == "layernorm" else 1)
        return blocks + embeddings + positions + norm

    @property
    def active_parameters(self):
        """Parameters one token meets: with experts, top_k of the E MLPs."""
        if self.experts == 1:
            return self.parameters
        mlp = self.ffn_matrices * self.n_embd * self.hidden
        return self.parameters - self.n_layer * (self.experts - self.top_k) * mlp

    @classmethod
    def from_gpt_config(cls, config, name="custom"):
        return cls(config.n_layer, config.n_embd, config.n_head, config.block_size, config.vocab_size, name)

    @classmethod
    def from_hf_config(cls, path_or_dict, name=None):
        """A ModelSpec from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2, GPT-2, Mixtral keys)."""
        values = path_or_dict
        if not isinstance(values, dict):
            try:
                with open(path_or_dict, encoding="utf-8") as handle:
                    values = json.load(handle)
            except (OSError, ValueError) as error:
                raise ConfigError(f"cannot read the model config {path_or_dict}: {error}") from None
        get = values.get
        try:
            if "n_embd" in values:  # GPT-2's names
                return cls(get("n_layer"), get("n_embd"), get("n_head"), get("n_positions") or get("n_ctx"),
                           get("vocab_size"), name or get("model_type", "gpt2"), ffn_hidden=get("n_inner") or 0)
            act = str(get("hidden_act", "silu"))
            return cls(get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads"),
                       get("max_position_embeddings"), get("vocab_size"), name or get("model_type", "hf"),
                       ffn="swiglu" if act in ("silu", "swish") else "gelu",
                       ffn_hidden=get("intermediate_size") or 0,
                       n_kv_head=get("num_key_value_heads") or 0,
                       norm="rmsnorm" if "rms_norm_eps" in values else "layernorm",
                       bias=bool(get("attention_bias", False) or get("mlp_bias", False)),
                       learned_positions=False, tied=bool(get("tie_word_embeddings", False)),
                       experts=get("num_local_experts") or 1, top_k=get("num_experts_per_tok") or 1)
        except TypeError as error:
            raise ConfigError(f"the model config lacks a field the planner needs: {error}") from None


def _llama(name, layers, width, heads, kv_heads, hidden, context, vocab):
    return ModelSpec(layers, width, heads, context, vocab, name, ffn="swiglu", ffn_hidden=hidden, n_kv_head=kv_heads,
                     norm="rmsnorm", bias=False, learned_positions=False, tied=False)


# GPT-2 small: Radford et al. 2019 (117M in the paper; 124M counted with tied embeddings).
# GPT-3 175B: Brown et al. 2020, Table 2.1 (96 layers, d_model 12288, 96 heads, context 2048).
# megatron-*: Narayanan et al. 2021, Table 1 (heads, hidden size, layers; s = 2048, V = 51,200).
# kor-22b: Korthikanti et al. 2022, Table 3 (64 heads, h 6144, 48 layers; the others are
#   Narayanan's 175B (= GPT-3), 530B and 1T shapes).
# Llama 2: Touvron et al. 2023, Table 1 (context 4096; 70B uses GQA with 8 KV heads) and the
#   released config.json files (FFN widths 11008 / 28672, vocabulary 32000).
# Llama 3: Dubey et al. 2024, Table 3 (8B: 32 layers, 4096, 32 heads, 8 KV heads, FFN 14336;
#   70B: 80, 8192, 64, 8, 28672; 405B: 126, 16384, 128, 8, 53248; vocabulary 128,256; context 8192).
# BLOOM-176B: Le Scao et al. 2022, Table 3 (70 layers, h 14336, 112 heads, s 2048; vocabulary
#   250,880 as padded for tp; ALiBi: no position table; tied embeddings; GELU MLP of 4h).
# MT-NLG 530B: Smith et al. 2022, section 2.4 (105 layers, h 20480, 128 heads, s 2048; GPT-2's
#   vocabulary padded to 50,272).
PRESETS = {
    "gpt2-small": ModelSpec(12, 768, 12, 1024, 50304, "gpt2-small"),
    "gpt3-175b": ModelSpec(96, 12288, 96, 2048, 51200, "gpt3-175b"),
    "megatron-1.7b": ModelSpec(24, 2304, 24, 2048, 51200, "megatron-1.7b"),
    "megatron-3.6b": ModelSpec(30, 3072, 32, 2048, 51200, "megatron-3.6b"),
    "megatron-7.5b": ModelSpec(36, 4096, 32, 2048, 51200, "megatron-7.5b"),
    "megatron-18b": ModelSpec(40, 6144, 48, 2048, 51200, "megatron-18b"),
    "megatron-39b": ModelSpec(48, 8192, 64, 2048, 51200, "megatron-39b"),
    "megatron-76b": ModelSpec(60, 10240, 80, 2048, 51200, "megatron-76b"),
    "megatron-145b": ModelSpec(80, 12288, 96, 2048, 51200, "megatron-145b"),
    "megatron-310b": ModelSpec(96, 16384, 128, 2048, 51200, "megatron-310b"),
    "megatron-530b": ModelSpec(105, 20480, 128, 2048, 51200, "megatron-530b"),
    "megatron-1t": ModelSpec(128, 25600, 160, 2048, 51200, "megatron-1t"),
    "kor-22b": ModelSpec(48, 6144, 64, 2048, 51200, "kor-22b"),
    # ZeRO's 7.5B example (Rajbhandari et al. 2020, section 3.1: Ψ = 7.5B); the shape is ours.
    "zero-7.5b": ModelSpec(40, 3840, 40, 1024, 51200, "zero-7.5b"),
    "llama2-7b": _llama("llama2-7b", 32, 4096, 32, 32, 11008, 4096, 32000),
    "llama2-70b": _llama("llama2-70b", 80, 8192, 64, 8, 28672, 4096, 32000),
    "llama3-8b": _llama("llama3-8b", 32, 4096, 32, 8, 14336, 8192, 128256),
    "llama3-70b": _llama("llama3-70b", 80, 8192, 64, 8, 28672, 8192, 128256),
    "llama3-405b": _llama("llama3-405b", 126, 16384, 128, 8, 53248, 8192, 128256),
    "bloom-176b": ModelSpec(70, 14336, 112, 2048, 250880, "bloom-176b", learned_positions=False),
    "mt-nlg-530b": ModelSpec(105, 20480, 128, 2048, 50272, "mt-nlg-530b"),
}


SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zbv")
ENGINES = ("minipar", "ideal")


@dataclass(frozen=True)
class Strategy:
    """One layout of a training step: the grid, the batch split and the memory options."""

    dp: int
    tp: int
    pp: int
    batch_size: int  # global batch, sequences
    microbatches: int = 1  # per replica and step
    schedule: str = "1f1b"  # one of SCHEDULES (zero-bubble ones: Qi et al. 2023; zbv has 2 chunks per rank)
    virtual_stages: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    recompute: str = ""  # "" | "full" (minipar: the chunk's forward reruns before its backward) | "selective"
    precision: str = "fp32"  # "fp32": minipar's engine, counted to the byte; "mixed": 16-bit compute (bf16/fp16)
    bucket_bytes: int = 1 << 20
    cp: int = 1  # context parallelism: the sequence split over cp ranks (ring attention)
    ep: int = 1  # expert parallelism: the experts split over ep of the dp × cp ranks
    state_bytes: int = 16  # mixed precision: bytes of model state per parameter, 16 (ZeRO's 2+2+12) or 18
    # (Megatron's fp32 main gradients: 2 + 4 + 12)
    engine: str = "minipar"  # what the step overlaps and when ZeRO-2 reduce-scatters (cost.py, memory.py):
    # "minipar": what minipar does (per-micro-batch reduce-scatter in ZeRO 2-3, overlap under ZeRO);
    # "ideal": every data-parallel collective hidden behind compute where it can be (the papers' runs)

    @property
    def dtype_bytes(self):
        """Bytes per activation, gradient and message element: 4 (fp32), 2 (fp16/bf16 mixed precision)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def world(self):
        return self.dp * self.tp * self.pp * self.cp

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
        interleaving = f" v={self.virtual_stages}" if self.virtual_stages > 1 and self.schedule != "zbv" else ""
        extras = [f"m={self.microbatches}", self.schedule + interleaving]
        extras += [f"ZeRO-{self.zero}"] if self.effective_zero else []
        extras += ["SP"] if self.sequence_parallel else []
        extras += [f"recompute-{self.recompute}"] if self.recompute else []
        grid = f"dp{self.dp} tp{self.tp} pp{self.pp}" + (f" cp{self.cp}" if self.cp > 1 else "")
        grid += f" ep{self.ep}" if self.ep > 1 else ""
        return grid + " " + " ".join(extras)

    def with_(self, **changes):
        return replace(self, **changes)


def check_strategy(model, strategy):
    """A ConfigError saying what does not divide, or None; the same checks as the Trainer's."""
    s = strategy
    problems = []
    if s.batch_size % (s.dp * s.microbatches):
        problems.append(f"global batch {s.batch_size} is not divisible by dp x micro-batches = {s.dp * s.microbatches}")
    for what, value in (("n_head", model.n_head), ("n_kv_head", model.kv_heads), ("the MLP width", model.hidden),
                        ("vocab_size", model.vocab_size)):
        if value % s.tp and not (what == "n_kv_head" and s.tp % value == 0):  # fewer KV heads than tp: copied
            problems.append(f"{what} ({value}) is not divisible by tp ({s.tp})")
    if s.sequence_parallel and model.block_size % s.tp:
        problems.append(f"sequence length {model.block_size} is not divisible by tp ({s.tp}) for sequence parallelism")
    if model.block_size % (2 * s.cp) and s.cp > 1:
        problems.append(f"sequence length {model.block_size} is not divisible by 2·cp ({2 * s.cp}) (zigzag chunks)")
    if model.experts % s.ep or (s.dp * s.cp) % s.ep:
        problems.append(f"ep ({s.ep}) must divide the experts ({model.experts}) and dp·cp ({s.dp * s.cp})")
    if model.n_layer < s.chunks:
        problems.append(f"{model.n_layer} layers cannot fill {s.chunks} pipeline chunks")
    if s.precision == "fp32" and not model.is_gpt2:
        problems.append("minipar's fp32 engine runs GPT-2-shaped models; plan this one in 16-bit (--precision bf16)")
    if s.recompute == "selective" and s.precision == "fp32":
        problems.append("minipar recomputes whole pipeline chunks (full); selective recomputation is planned "
                        "only for mixed precision (--precision mixed)")
    if s.schedule not in SCHEDULES or s.engine not in ENGINES:
        problems.append(f"schedule must be one of {SCHEDULES} and engine one of {ENGINES}")
    if s.virtual_stages > 1 and s.schedule not in ("interleaved", "zbv") or \
            s.schedule == "interleaved" and (model.n_layer % s.chunks or s.microbatches % s.pp):
        problems.append("interleaving needs the interleaved schedule, L a multiple of p·v and m a multiple of p")
    if s.schedule == "zbv" and s.virtual_stages != 2:
        problems.append("zbv runs two chunks per rank (virtual_stages = 2)")
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

def _norm(model, prefix):
    if model.norm == "rmsnorm":
        return [(prefix + "norm.weight", model.n_embd)]
    return [(prefix + "norm.weight", model.n_embd), (prefix + "norm.bias", model.n_embd)]


def _linear(model, name, inputs, outputs, bias_size):
    weight = [(name + ".weight", inputs * outputs)]
    return weight + ([(name + ".bias", bias_size)] if model.bias else [])


@functools.lru_cache(maxsize=1024)
def block_parameters(model, tp, ep=1):
    """(name, elements) of one block's tensor-parallel shard, in ``named_parameters`` order
    (minipar's GPT for GPT-2 shapes; the same pieces, Llama's way, otherwise). With E experts a
    rank holds E/ep of them (and the router, h × E)."""
    h, f, t = model.n_embd, model.hidden, tp
    qkv = (h + 2 * model.kv_width) // t
    attention = (_norm(model, "") + _linear(model, "qkv", h, qkv, qkv)
                 + _linear(model, "attention.output", h // t, h, h))
    if model.ffn == "swiglu":
        mlp = _linear(model, "gate_up", h, 2 * f // t, 2 * f // t) + _linear(model, "mlp.output", f // t, h, h)
    else:
        mlp = _linear(model, "hidden", h, f // t, f // t) + _linear(model, "mlp.output", f // t, h, h)
    if model.experts > 1:
        local = model.experts // ep
        mlp = [("router.weight", h * model.experts)] + [(f"experts.{name}", n * local) for name, n in mlp]
    return attention + _norm(model, "") + mlp


def piece_parameters(model, piece, tp, ep=1):
    """(name, elements) of a piece: "embedding", "block" or "head" (whose first is the tied weight,
    or, untied, its own output layer)."""
    h = model.n_embd
    token = ("embedding.token.weight", model.vocab_size // tp * h)
    if piece == "embedding":
        positions = [("embedding.position.weight", model.block_size * h)] if model.learned_positions else []
        return [token] + positions
    if piece == "head":
        output = token if model.tied else ("head.output.weight", model.vocab_size // tp * h)
        return [output] + _norm(model, "head.")
    return block_parameters(model, tp, ep)


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
        for name, n in piece_parameters(model, piece, strategy.tp, strategy.ep):
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
    shared = model.tied and sum(piece in ("embedding", "head") for _, piece in pieces) == 2
    units, tied = [], None
    for index, (_, piece) in enumerate(pieces):
        own = [(name, n) for name, n in piece_parameters(model, piece, strategy.tp, strategy.ep)
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
