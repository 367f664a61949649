"""The model as the planner sees it: its shapes, the presets, and the parameters of each piece.

Symbols (as in /docs/planning.md): $L$ layers, $h$ = n_embd, $a$ heads, $s$ sequence length,
$V$ vocabulary, $b$ micro-batch rows, $t$ tensor-parallel ranks, $p$ pipeline stages, $v$ chunks per
stage, $m$ micro-batches, $N_d$ data-parallel ranks, $Ψ$ parameters on a rank, $e$ bytes per element.

A ModelSpec is a decoder's shapes: minipar's GPT ($Ψ = 12Lh² + 13Lh + Vh + sh + 2h$:
the blocks, the embeddings and the final norm), or the Llama family's SwiGLU, GQA, RMSNorm, untied embeddings,
and experts; presets and Hugging Face config.json files make one. ``block_parameters`` and
``piece_parameters`` list a piece's parameters, each a tensor-parallel shard, in the order of
minipar's ``named_parameters``. How a layout (a Strategy) places them on each rank:
minipar/plan/strategy.py.

What these cost in bytes (parameters, gradients, optimizer state, activations, buffers):
minipar/plan/memory.py; in time: minipar/plan/cost.py and kernels.py; the search: search.py.
"""
import functools
import json
import math
from dataclasses import dataclass

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
        """$Ψ$ of the whole model: blocks, embeddings, final norm (and the output layer if untied).

        GPT-2 shapes: $12Lh² + 13Lh + Vh + sh + 2h$ (the sum of ``block_parameters``)."""
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


def part_length(n, count):
    return -(-n // count)


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def ceil_div(a, b):
    return math.ceil(a / b)
