"""What a layout is and which pieces and parameters it puts on each rank.

Symbols as in model.py (and /docs/planning.md). A Strategy is the dp × tp × pp (× cp, ep) grid,
the batch split into $m$ micro-batches of $b$ rows, the schedule, the memory options and the engine;
``check_strategy`` refuses what the Trainer refuses. The $L$ layers are cut into $pv$ chunks of
$⌊L/(pv)⌋$ layers, one more for the first $L mod pv$ (``chunk_layers``, as ``partition`` splits
them), and stage $r$ runs the chunks $c$ with $c mod p = r$ (``rank_chunks``): chunk 0 carries the
embedding, chunk $pv − 1$ the head. ``rank_parameters`` lists each parameter (each a
tensor-parallel shard, ``model.piece_parameters``) a stage holds, the tied weight once, the same
list in the same order as the Trainer's ``stage_parameters``; ``zero_units`` groups it as ZeRO
does (parallel/zero.py), each parameter cut into $N_d$ parts of $⌈n/N_d⌉$ elements
(``model.part_length``).
"""
import functools
from dataclasses import dataclass, replace

from minipar.errors import ConfigError
from minipar.plan.model import piece_parameters

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
    """The global chunk numbers stage ``stage`` runs: $c$ with $c mod p$ = ``stage`` (round robin)."""
    return [c for c in range(strategy.chunks) if c % strategy.pp == stage]


def representative_stages(strategy):
    """Stages that can be the fullest or the slowest: the first (most layers, most in flight, the
    embedding) and the last (the head); the middle ones hold no more than the first."""
    return sorted({0, strategy.pp - 1})


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
