"""Seconds for one micro-batch through one layer on a GPU: its GEMMs, its memory-bound kernels, its
tensor-, context- and expert-parallel collectives. Used for the named profiles (hardware.py);
a calibration file (calibrate.py) times CPU ranks from measured blocks instead.

Symbols: $b$ micro-batch rows, $s$ sequence length, $s_c = s/cp$ the rank's share of it, $T = b·s_c$
the tokens a rank sees, $h$ hidden size, $a$ heads, $g$ KV heads, $d = h/a$, $f$ the MLP width, $V$
vocabulary, $t$ tensor-parallel ranks, $e = 2$ bytes (16-bit activations).

GEMMs (shape-dependent efficiency). A GEMM of $m × k$ by $k × n$ takes $2mkn$ FLOPs and, at least,
reads and writes its three operands once ($2(mk + kn + mn)$ bytes). Its time is the roofline's larger
of the two, FLOPs / (peak · $η_{gemm}$ · wave) and bytes / (HBM bandwidth · $η_{mem}$), where ``wave``
is the tile-quantisation factor: the output is cut into $128 × 128$ tiles, run in waves of one tile
per SM, and a last, partial wave leaves SMs idle (NVIDIA, "Matrix Multiplication Background User's
Guide", sections on wave quantisation and arithmetic intensity). $η_{gemm}$ is the share of the data
sheet's peak that cuBLAS reaches on large, well-shaped bf16/fp16 GEMMs: a documented global constant per
GPU (hardware.py), not a per-model fit.

Per layer, forward, on one tensor-parallel rank (Shoeybi et al. 2019's splits):

| GEMM         | shapes                                                   |
|--------------|----------------------------------------------------------|
| QKV          | $T × h$ by $h × (h + 2g·d)/t$                            |
| scores, $PV$ | $b·a/t$ batched $s_c × d$ by $d × s$ (twice: $4·T·s·h/t$ FLOPs)      |
| output       | $T × h/t$ by $h/t × h$                                   |
| MLP (GELU)   | $T × h$ by $h × f/t$, $T × f/t$ by $f/t × h$             |
| MLP (SwiGLU) | $T × h$ by $h × 2f/t$, $T × f/t$ by $f/t × h$            |
| experts      | the MLP's FLOPs × top_k, the tokens spread over $E/ep$ local experts |

Fused causal attention does half of the scores' and $PV$'s FLOPs: it skips the masked tiles.
The backward runs every GEMM twice (input and weight gradients). Memory-bound kernels, bytes
moved forward ($e = 2$; $t_{sp}$ is $t$ under sequence parallelism, else 1):

| kernel          | what it does                                   | bytes                                |
|-----------------|------------------------------------------------|--------------------------------------|
| 2 norms         | read $x$, write $y$                            | $8·T·h / t_{sp}$                     |
| 2 residual adds | bias, dropout (1-byte mask), add               | $14·T·h / t_{sp}$                    |
| activation      | GELU reads and writes $T·f/t$; SwiGLU reads two | $4·T·f/t$ or $6·T·f/t$              |
| softmax         | scale, mask, softmax; then dropout             | $9·T·s·a/t$ (none with fused attention) |

and the backward moves twice as much. Selective recomputation (Korthikanti et al. 2022) reruns
the scores, softmax, dropout and $PV$ in the backward; full recomputation the whole forward.
"""
import math

WAVE_TILE = 128  # rows and columns of a GEMM output tile (cuBLAS's common large tile)


def gemm_time(m, k, n, gpu, batch=1):
    """Seconds for ``batch`` GEMMs of (m × k)·(k × n) in 16-bit on ``gpu`` (module docstring)."""
    flops = 2.0 * m * k * n * batch
    tiles = math.ceil(m / WAVE_TILE) * math.ceil(n / WAVE_TILE) * batch
    waves = math.ceil(tiles / gpu.sms)
    wave = tiles / (waves * gpu.sms)
    compute = flops / (gpu.peak * gpu.gemm_efficiency * wave)
    memory = 2.0 * (m * k + k * n + m * n) * batch / (gpu.hbm * gpu.memory_efficiency)
    return max(compute, memory)


def layer_gemm_shapes(model, strategy):
    """One layer's forward GEMMs on one rank: {"dense": [...], "attention": [...]}, each entry
    (m, k, n, batch, repeat): ``repeat`` × ``batch`` GEMMs of (m × k)·(k × n) (module docstring)."""
    b, t = strategy.micro_batch, strategy.tp
    s, h, f = model.block_size, model.n_embd, model.hidden
    tokens, s_local = b * s // strategy.cp, s // strategy.cp
    dense = [(tokens, h, (h + 2 * model.kv_width) // t, 1, 1), (tokens, h // t, h, 1, 1)]
    inner = 2 * f if model.ffn == "swiglu" else f
    if model.experts > 1:  # top_k copies of each token, spread over the local experts
        local = model.experts // strategy.ep
        routed = max(1, tokens * model.top_k // model.experts)  # tokens per expert, balanced
        # each rank computes for the tokens of its ep group sent to its experts: ep × the local GEMMs
        dense += [(routed, h, inner // t, local, strategy.ep), (routed, f // t, h, local, strategy.ep)]
    else:
        dense += [(tokens, h, inner // t, 1, 1), (tokens, f // t, h, 1, 1)]
    heads = b * model.n_head // t
    return {"dense": dense, "attention": [(s_local, model.head_dim, s, heads, 2)]}  # QKᵀ and P·V


def backward_shapes(m, k, n):
    """The two GEMMs of $C = A·B$'s backward: $dA = dC·Bᵀ$ ($m × n$ by $n × k$) and $dB = Aᵀ·dC$
    ($k × m$ by $m × n$)."""
    return (m, n, k), (k, m, n)


def layer_gemms(model, strategy, gpu):
    """(dense GEMM seconds, attention GEMM seconds) of one layer's forward on one rank."""
    shapes = layer_gemm_shapes(model, strategy)
    return tuple(sum(repeat * gemm_time(m, k, n, gpu, batch) for m, k, n, batch, repeat in shapes[part])
                 for part in ("dense", "attention"))


def layer_memory_bytes(model, strategy, fused_attention):
    """(bytes moved by the layer's memory-bound kernels forward, of which the softmax's)."""
    b, t, e = strategy.micro_batch, strategy.tp, 2
    s, h, f = model.block_size, model.n_embd, model.hidden
    tokens = b * s // strategy.cp
    t_sp = t if strategy.sequence_parallel else 1
    activation = (6 if model.ffn == "swiglu" else 4) * tokens * f * model.top_k // t
    elementwise = (8 + 14) * tokens * h // t_sp + activation
    softmax = 0 if fused_attention else 9 * tokens * s * model.n_head // t
    return e / 2 * (elementwise + softmax), e / 2 * softmax


def layer_compute_times(model, strategy, gpu, fused_attention=False):
    """{"forward", "backward", "recompute"} seconds of one layer's kernels on one rank (no comm).

    Fused causal attention computes only the tiles on or below the diagonal: FlashAttention skips
    the tiles the causal mask removes whole (Dao 2023, FlashAttention-2, section 3.1.1), so its
    $QKᵀ$ and $P·V$ do about half the products, $s²/2$ per head (per rank with context parallelism's
    zigzag, which gives every rank the same share). Unfused kernels (Megatron's masked softmax)
    compute the whole $s × s$ and mask afterwards."""
    dense, attention = layer_gemms(model, strategy, gpu)
    if fused_attention:
        attention /= 2
    moved, softmax = layer_memory_bytes(model, strategy, fused_attention)
    bandwidth = gpu.hbm * gpu.memory_efficiency
    forward = dense + attention + moved / bandwidth
    backward = 2 * (dense + attention) + 2 * moved / bandwidth
    if strategy.recompute == "full":
        recompute = forward
    elif strategy.recompute == "selective":
        recompute = attention + softmax / bandwidth
    else:
        recompute = 0.0
    return {"forward": forward, "backward": backward, "recompute": recompute}


def head_compute_times(model, strategy, gpu):
    """The output layer (T × h by h × V/t) and its cross-entropy (fp32 softmax over V/t)."""
    tokens = strategy.micro_batch * model.block_size // strategy.cp
    logits = gemm_time(tokens, model.n_embd, model.vocab_size // strategy.tp, gpu)
    softmax = 3 * 4 * tokens * model.vocab_size / strategy.tp / (gpu.hbm * gpu.memory_efficiency)
    return {"forward": logits + softmax, "backward": 2 * logits + softmax, "recompute": 0.0}


# ---- CPU ranks: GEMM rates measured per shape class by ``calibrate`` --------------------------------
#
# A CPU rank's BLAS reaches very different FLOP/s on a 4 × 64 × 64 product (call overhead, no
# blocking to reuse) and on a 256 × 512 × 512 one. ``calibrate`` times a grid of shape classes: a
# GEMM of (m × k)·(k × n) with its dimensions sorted a ≤ b ≤ c is the class (thin = a,
# wide = √(bc)), measured as thin × wide by wide × wide. A GEMM's seconds are its FLOPs over the
# rate interpolated (bilinearly, in log2 of thin and wide, on seconds per FLOP) between the four
# measured classes around it; beyond the grid the nearest edge stands in. What GEMMs do not
# explain (norms, GELU, softmax, residual adds, Python and NumPy call overheads) is
# ``c + e · elements`` per block forward + backward, fitted by ``calibrate`` on real blocks, where
# elements = T·(h + f/t + s·a/t) counts the residual stream, the MLP activation and the scores.

THIN = (4, 16, 64, 256)  # the grid calibrate measures: the thin dimension
WIDE = (32, 128, 512)  # and the geometric mean of the other two


def _bracket(grid, value):
    """(i, weight of grid[i + 1]) for ``value`` between grid points, in log2; clamped to the ends."""
    x = math.log2(min(max(value, grid[0]), grid[-1]))
    for i in range(len(grid) - 1):
        low, high = math.log2(grid[i]), math.log2(grid[i + 1])
        if x <= high:
            return i, (x - low) / (high - low)
    return len(grid) - 2, 1.0


def gemm_seconds_cpu(m, k, n, table, batch=1):
    """Seconds for ``batch`` GEMMs of (m × k)·(k × n) at the rates of ``table``
    ({(thin, wide): FLOP/s} on THIN × WIDE, from ``calibrate``)."""
    a, b, c = sorted((m, k, n))
    i, u = _bracket(THIN, a)
    j, w = _bracket(WIDE, math.sqrt(b * c))
    per_flop = ((1 - u) * (1 - w) / table[THIN[i], WIDE[j]] + u * (1 - w) / table[THIN[i + 1], WIDE[j]]
                + (1 - u) * w / table[THIN[i], WIDE[j + 1]] + u * w / table[THIN[i + 1], WIDE[j + 1]])
    return 2.0 * m * k * n * batch * per_flop


def block_elements(model, strategy):
    """Elements one block's elementwise kernels scale with on a rank: T·(h + f/t + s·a/t)."""
    tokens = strategy.micro_batch * model.block_size // strategy.cp
    t = strategy.tp
    return tokens * (model.n_embd + model.hidden * model.top_k // t + model.block_size * model.n_head // t)


def cpu_layer_times(model, strategy, machine):
    """{"forward", "backward", "attention"} seconds of one block on a calibrated CPU rank (the
    attention GEMMs' forward on their own: selective recomputation reruns them)."""
    table = machine.gemm_rates
    shapes = layer_gemm_shapes(model, strategy)
    forward = {part: sum(repeat * gemm_seconds_cpu(m, k, n, table, batch) for m, k, n, batch, repeat in entries)
               for part, entries in shapes.items()}
    backward = sum(repeat * gemm_seconds_cpu(*shape, table, batch)
                   for entries in shapes.values() for m, k, n, batch, repeat in entries
                   for shape in backward_shapes(m, k, n))
    rest = machine.overhead_per_block + machine.elementwise_seconds * block_elements(model, strategy)
    return {"forward": forward["dense"] + forward["attention"] + rest / 3, "backward": backward + 2 * rest / 3,
            "attention": forward["attention"]}


def cpu_head_times(model, strategy, machine):
    """The output layer (T × h by h × V/t) and its cross-entropy's elementwise work on a CPU rank."""
    tokens = strategy.micro_batch * model.block_size // strategy.cp
    shape = (tokens, model.n_embd, model.vocab_size // strategy.tp)
    table = machine.gemm_rates
    softmax = machine.elementwise_seconds * tokens * model.vocab_size / strategy.tp
    backward = sum(gemm_seconds_cpu(*s, table) for s in backward_shapes(*shape))
    return {"forward": gemm_seconds_cpu(*shape, table) + softmax / 3, "backward": backward + 2 * softmax / 3}
