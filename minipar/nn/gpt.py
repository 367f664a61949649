"""A GPT-2 style language model, readable top to bottom (after nanoGPT's layout).

    ids (B, T) -> token embedding + position embedding -> n_layer pre-LN Blocks
        -> final LayerNorm -> logits = x @ token_embedding^T  (the output head is tied)

The model is also a chain of pieces (``GPT.pieces``): embedding, blocks, head. Pipeline
parallelism hands each stage a run of pieces; tensor parallelism builds this same model from
other ``layers`` (nn/layers.py ``Layers``: its Linears and embeddings hold slices and talk to
their ranks), never a second copy of it.

Initialisation follows GPT-2 (Radford et al. 2019): weights ~ N(0, 0.02), the two
projections that write into the residual stream scaled by 1/sqrt(2 n_layer) so the
residual's variance does not grow with depth, biases 0, LayerNorm gains 1. Everything
is drawn from one seeded generator in the order of ``named_parameters()``, so the same
seed gives the same model on every rank and in every run; the parallel models are built
as exact slices of this one.
"""
import dataclasses
import math
from dataclasses import dataclass

from minipar import ops
from minipar.backend import default_dtype, host_rng, xp
from minipar.errors import ConfigError, require_positive_int
from minipar.nn.layers import LAYERS, Block
from minipar.nn.module import Module
from minipar.nn.moe import MixtureOfExperts
from minipar.tensor import Tensor, no_grad


@dataclass
class GPTConfig:
    vocab_size: int = 65  # distinct tokens; characters for the char-level tokenizer
    block_size: int = 64  # the longest context the position embedding covers
    n_layer: int = 4  # transformer blocks; the unit pipeline parallelism splits
    n_head: int = 4  # attention heads; the unit tensor parallelism splits attention by
    n_embd: int = 128  # residual stream width C; must be divisible by n_head
    dropout: float = 0.0  # 0 keeps runs exactly comparable across parallel layouts
    bias: bool = True  # biases in Linear layers, as in GPT-2
    seed: int = 1337  # one seed fixes the initial weights everywhere
    # mixture of experts in place of every block's MLP (nn/moe.py); 0 keeps the dense MLP
    n_experts: int = 0  # E expert MLPs per block, of which each token uses top_k
    top_k: int = 2  # experts per token (1: Switch, 2: GShard)
    capacity_factor: float = 1.25  # each expert takes at most CF·k·T/E tokens of a group; the rest are dropped
    aux_loss_weight: float = 0.01  # alpha of Switch's load-balancing loss (equals alpha at perfect balance)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            allowed = (int, float) if field.type is float else field.type
            if isinstance(value, bool) != (field.type is bool) or not isinstance(value, allowed):
                raise ConfigError(f"GPTConfig.{field.name} must be {field.type.__name__}, got {value!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            require_positive_int(f"GPTConfig.{name}", getattr(self, name))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        require_positive_int("GPTConfig.n_experts", self.n_experts, minimum=0)
        if self.n_experts and (self.top_k not in (1, 2) or self.top_k > self.n_experts):
            raise ConfigError(f"top_k must be 1 or 2 and at most n_experts ({self.n_experts}), got {self.top_k}")
        if self.n_experts and not (self.capacity_factor > 0 and self.aux_loss_weight >= 0):
            raise ConfigError(f"capacity_factor must be > 0 and aux_loss_weight >= 0, got {self.capacity_factor} "
                              f"and {self.aux_loss_weight}")

    @classmethod
    def from_dict(cls, values):
        """Build from a dict, refusing unknown keys with the list of valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ConfigError(f"unknown GPTConfig keys {unknown}; valid keys are {valid}")
        return cls(**values)

    def to_dict(self):
        return dataclasses.asdict(self)


def residual_projection_names(n_layer):
    """The weights that write into the residual stream (initialised smaller): attention's and the
    MLP's output projections, or the experts' output weights in a mixture of experts."""
    return {f"blocks.{i}.{part}.output.weight" for i in range(n_layer)
            for part in ("attention", "mlp", "mlp.experts")}


def initial_state(config, dtype=None):
    """The GPT-2 initial weights for ``config``, name -> array of ``dtype`` (the backend's default
    float type if None), drawn in float64 in parameter order and rounded once to ``dtype``."""
    shapes = {name: p.shape for name, p in GPT(config, initialise=False).named_parameters()}
    generator = host_rng(config.seed)
    projections = residual_projection_names(config.n_layer)
    state = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            values = xp.zeros(shape)
        elif "norm" in name:  # LayerNorm gains
            values = xp.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * config.n_layer) if name in projections else 0.02
            values = generator.normal(0.0, std, size=shape)
        state[name] = xp.asarray(values, dtype=default_dtype() if dtype is None else dtype)
    return state


class TokenAndPositionEmbedding(Module):
    """ids (B, T) -> token embedding + position embedding (B, T, C): the first pipeline piece."""

    def __init__(self, config, layers=LAYERS):
        self.block_size = config.block_size
        self.token = layers.token_embedding(config.vocab_size, config.n_embd)
        self.position = layers.position_embedding(config.block_size, config.n_embd)
        self.dropout = layers.dropout(config.dropout, config.seed)
        self.positions = layers.positions  # which positions this process computes: all of them here

    def forward(self, ids):  # (B, T) -> (B, T, C)
        ids = ids.data if isinstance(ids, Tensor) else ids
        if ids.shape[-1] > self.block_size:
            raise ConfigError(f"sequence length {ids.shape[-1]} exceeds block_size {self.block_size}")
        positions = self.positions(ids.shape[-1])
        return self.dropout(self.token(ids) + self.position(positions))


class TiedHead(Module):
    """Final LayerNorm, logits $= x Eᵀ$ with $E$ the token embedding, and the loss: the last piece.

    Tying the output layer to the input embedding (Press & Wolf 2017) saves V*C parameters.
    When the embedding and the head sit on different pipeline stages, each holds a copy of
    E and the two gradients must be summed (see parallel/pipeline).
    """

    def __init__(self, config, token_weight, layers=LAYERS):
        self.norm = layers.layer_norm(config.n_embd)
        self.token_weight = token_weight  # the same Parameter object as the embedding's
        self.vocabulary = layers.vocabulary()  # how the logits are held (whole here) and their loss

    def local_logits(self, x):  # (B, T, C) -> (B, T, V): the logits this process holds
        return ops.linear(self.vocabulary.read(self.norm(x)), self.token_weight.transpose())

    def logits(self, x):  # (B, T, C) -> (B, T, V), every logit
        return self.vocabulary.whole(self.local_logits(x))

    def forward(self, x, targets):  # -> scalar mean cross-entropy
        targets = targets.data if isinstance(targets, Tensor) else targets
        return self.vocabulary.cross_entropy(self.local_logits(x), targets)


class GPT(Module):
    """The whole model. ``dtype``: its parameters' float type ("float32", "float64"); None takes
    the backend's default (float32 unless a program chose otherwise with set_default_dtype).
    ``layers``: what each part is made of (nn/layers.py); a parallel layout passes its own and
    fills the weights itself (``initialise=False``)."""

    def __init__(self, config, initialise=True, dtype=None, layers=LAYERS):
        self.config = config
        self.embedding = TokenAndPositionEmbedding(config, layers)
        self.blocks = [Block(config.n_embd, config.n_head, config.dropout, config.bias, config.seed + 2 * i + 1,
                             layers, mlp=self.experts_layer(config)) for i in range(config.n_layer)]
        self.head = TiedHead(config, self.embedding.token.weight, layers)
        for name, p in self.named_parameters():
            p.name = name  # its name in the whole model, which a piece alone does not know
        if dtype is not None:
            self.to(dtype)
        if initialise:
            self.load_state_dict(initial_state(config, dtype))

    @staticmethod
    def experts_layer(config):
        """A block's mixture of experts (nn/moe.py) when ``config.n_experts`` > 0, else None (an MLP)."""
        if not config.n_experts:
            return None
        return MixtureOfExperts(config.n_embd, config.n_experts, config.top_k, config.capacity_factor,
                                config.aux_loss_weight, bias=config.bias)

    def pieces(self):
        """The model as a chain of pieces, the unit a pipeline stage is made of:
        [embedding, block 0, ..., block L-1, head]; piece i feeds piece i+1."""
        return [self.embedding, *self.blocks, self.head]

    def forward(self, ids, targets=None):
        """Logits (B, T, V) and, given targets (B, T), the mean cross-entropy loss."""
        ids = ids.data if isinstance(ids, Tensor) else ids
        x = self.embedding(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head.logits(x)
        loss = ops.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def generate(self, ids, max_new_tokens, temperature=1.0, seed=0, greedy=False, num_tokens=None):
        """Extend ids (B, T) by sampling one token at a time from the model.

        ``num_tokens``: only ids below it may be generated. The vocabulary is padded (so it
        splits over tensor-parallel ranks); the padding rows are not tokens and never may be.
        """
        generator = host_rng(seed)
        was_training = self.training
        self.eval()
        with no_grad():
            for _ in range(max_new_tokens):
                context = ids[:, -self.config.block_size:]
                logits = self(context)[0].data[:, -1, :num_tokens]  # (B, V), padding dropped
                if greedy:
                    next_ids = logits.argmax(axis=-1)
                else:
                    probabilities = ops.softmax(Tensor(logits / temperature)).data
                    next_ids = xp.asarray([generator.choice(len(p), p=p / p.sum()) for p in probabilities])
                ids = xp.concatenate([ids, next_ids[:, None].astype(ids.dtype)], axis=1)
        self.train(was_training)
        return ids
