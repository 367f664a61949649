"""Context parallelism: the sequence itself split over the N ranks of a cp group.

Each rank holds $T/N$ tokens of every sequence, and every layer but attention works on its
tokens alone. Attention needs every earlier key, so keys and values must reach the queries.

Layouts (where a rank's tokens come from). The sequence is cut into equal chunks:

- contiguous: $N$ chunks, rank $i$ holds chunk $i$;
- zigzag: $2N$ chunks, rank $i$ holds chunks $i$ and $2N−1−i$ (Brandon et al. 2023 balance the
  causal work the same way by striping; zigzag is Megatron-core's layout).

Under a causal mask a query chunk $a$ meets a key chunk $b$ fully when $b < a$, half (the
diagonal block, masked above its diagonal) when $b = a$, and not at all when $b > a$. With
contiguous chunks rank $r$ does $r + 1/2$ blocks of work, so max/mean $= (2N−1)/N$; in zigzag
each rank does $2N$ half-chunk blocks (of a quarter the area): the same everywhere.

Ring attention (Liu et al. 2023). K and V blocks travel around the ring $r → r+1$; at step $s$
rank $r$ holds the block of rank $r−s$, attends its queries to it and merges the partial result
into its running one with the log-sum-exp rule (``merge_partials``). Backward recomputes
each block's probabilities from the saved log-sum-exp and sends dK/dV around the ring
after the K/V, so each block's gradient arrives home after $N−1$ hops.

All-gather attention (Llama 3, Dubey et al. 2024, section 3.3.2): all-gather K and V over
the group, attend the local queries to the whole sequence with a position mask, and
reduce-scatter dK, dV in backward.

Elements sent per rank per layer ($B$ sequences, width $C$): ring forward $2(N−1) B (T/N) C$;
ring backward $4(N−1) B (T/N) C$ (K, V again and dK, dV); all-gather forward the same
$2(N−1) B (T/N) C$, backward $2(N−1) B (T/N) C$. See docs/context_parallel.md.
"""
from dataclasses import dataclass

from minipar.backend import xp
from minipar.errors import ConfigError, ShapeError
from minipar.ops.attention import attention_backward, attention_forward, causal_mask, scaled_scores
from minipar.tensor import Function

LAYOUTS = ("contiguous", "zigzag")
VARIANTS = ("ring", "allgather")
KV_TAG, GRAD_TAG = 231, 232  # the ring's two kinds of message


# ---- layouts -------------------------------------------------------------------------------

def chunks_of_rank(rank, size, layout):
    """The sequence chunks rank ``rank`` of ``size`` holds, in the order it holds them."""
    return (rank,) if layout == "contiguous" else (rank, 2 * size - 1 - rank)


def check_layout(length, size, layout):
    """Refuse, in one sentence, a layout that does not split ``length`` tokens evenly."""
    if layout not in LAYOUTS:
        raise ConfigError(f"cp layout must be one of {list(LAYOUTS)}, got {layout!r}")
    chunks = size * len(chunks_of_rank(0, size, layout))
    if length % chunks:
        raise ConfigError(f"sequence length {length} does not split into the {chunks} equal chunks that "
                          f"cp {size} with the {layout} layout needs; use a multiple of {chunks}")
    return length // chunks


def token_positions(rank, size, length, layout):
    """The positions (0..T-1) of the tokens rank ``rank`` holds, in its order: (T/N,)."""
    chunk = check_layout(length, size, layout)
    return xp.concatenate([xp.arange(c * chunk, (c + 1) * chunk) for c in chunks_of_rank(rank, size, layout)])


# ---- the merge rule ------------------------------------------------------------------------

def merge_partials(out, log_sum_exp, partial, partial_log_sum_exp):
    """Merge attention over a new block of keys into a running result, in place.

    With $l = log Σ_j exp(S_{ij})$ over each part's keys, the softmax over the union is

    $$l = m + log(exp(l_1 − m) + exp(l_2 − m)),   m = max(l_1, l_2)$$

    $$o = exp(l_1 − l) o_1 + exp(l_2 − l) o_2$$

    (each part's probabilities are its own $exp(S − l_k)$, rescaled by $exp(l_k − l)$). A running
    $l_1$ of $−∞$ (no keys yet) gives $o = o_2$; $l_2$ is always finite here. ``out`` (..., d) and
    ``log_sum_exp`` (...) are updated in place and keep their dtype (course exercise ring_attention).
    """
    ### BEGIN SOLUTION
    m = xp.maximum(log_sum_exp, partial_log_sum_exp)
    merged = m + xp.log(xp.exp(log_sum_exp - m) + xp.exp(partial_log_sum_exp - m))
    out *= xp.exp(log_sum_exp - merged)[..., None]
    out += xp.exp(partial_log_sum_exp - merged)[..., None] * partial
    log_sum_exp[...] = merged
    ### END SOLUTION


class MergePartials(Function):
    """``merge_partials`` as a differentiable op, for teaching and gradient checks.

    Input (o1, l1, o2, l2); output (..., d+1): o in the first d columns, l in the last.
    With w_k = exp(l_k - l):  dl/dl_k = w_k,  do/do_k = w_k,  do/dl_k = w_k (o_k - o), so
        g_ok = w_k g_o,   g_lk = w_k (g_l + sum_d g_o (o_k - o)).
    """

    @staticmethod
    def forward(ctx, out1, lse1, out2, lse2):
        out, lse = out1.copy(), lse1.copy()
        merge_partials(out, lse, out2, lse2)
        ctx.save_for_backward(out1, lse1, out2, lse2, out, lse)
        return xp.concatenate([out, lse[..., None]], axis=-1)

    @staticmethod
    def backward(ctx, grad):
        out1, lse1, out2, lse2, out, lse = ctx.saved
        grad_out, grad_lse = grad[..., :-1], grad[..., -1]
        grads = []
        for part_out, part_lse in ((out1, lse1), (out2, lse2)):
            weight = xp.exp(part_lse - lse)
            grads += [weight[..., None] * grad_out, weight * (grad_lse + (grad_out * (part_out - out)).sum(axis=-1))]
        return tuple(grads)


# ---- the work per block pair ---------------------------------------------------------------

def pair_kind(query_chunk, key_chunk):
    """'full', 'diagonal' (causal within the block) or None (entirely in the future: skipped)."""
    return "full" if key_chunk < query_chunk else "diagonal" if key_chunk == query_chunk else None


@dataclass
class AttentionWork:
    """Attention work one rank did in forward, counted by the engine as it goes.

    ``causal_entries``: query-key score entries per sequence and head inside the causal
    region, a diagonal block counting half (as a causal kernel skipping masked tiles does);
    FLOPs $= 4dBH·E$, $E$ = ``causal_entries`` ($QKᵀ$ and $PV$). ``computed_entries``: what was multiplied
    (a diagonal block whole). ``peak_score_elements``: the largest scores array at once.
    """

    full_pairs: int = 0
    diagonal_pairs: int = 0
    skipped_pairs: int = 0
    causal_entries: float = 0.0
    computed_entries: int = 0
    peak_score_elements: int = 0

    def count_pair(self, kind, query_rows, key_rows):
        if kind is None:
            self.skipped_pairs += 1
            return
        self.full_pairs += kind == "full"
        self.diagonal_pairs += kind == "diagonal"
        self.causal_entries += query_rows * key_rows * (1.0 if kind == "full" else 0.5)

    def count_scores(self, scores_shape):
        rows, columns = scores_shape[-2:]
        elements = 1
        for extent in scores_shape:
            elements *= extent
        self.computed_entries += rows * columns
        self.peak_score_elements = max(self.peak_score_elements, elements)


def _chunk_slices(length, count):
    size = length // count
    return [slice(i * size, (i + 1) * size) for i in range(count)]


def attend_block(q, k, v, query_chunks, key_chunks, out, log_sum_exp, work):
    """Attend every local query chunk to every chunk of one K/V block; merge into (out, log_sum_exp)."""
    for query_chunk, rows in zip(query_chunks, _chunk_slices(q.shape[-2], len(query_chunks))):
        for key_chunk, columns in zip(key_chunks, _chunk_slices(k.shape[-2], len(key_chunks))):
            kind = pair_kind(query_chunk, key_chunk)
            work.count_pair(kind, rows.stop - rows.start, columns.stop - columns.start)
            if kind is None:
                continue
            mask = causal_mask(rows.stop - rows.start, q.dtype) if kind == "diagonal" else None
            partial, probabilities, partial_lse = attention_forward(q[..., rows, :], k[..., columns, :],
                                                                    v[..., columns, :], mask)
            work.count_scores(probabilities.shape)
            merge_partials(out[..., rows, :], log_sum_exp[..., rows], partial, partial_lse)


def attend_block_backward(saved, grad, row_dot, key_block, query_chunks, key_chunks, grad_q, grad_kv):
    """Add this block's share of dQ (into grad_q) and dK, dV (into grad_kv) for every chunk pair.

    Each pair's probabilities are recomputed from the final log-sum-exp: $P = exp(S − l)$.
    """
    q, log_sum_exp = saved
    k, v = key_block
    for query_chunk, rows in zip(query_chunks, _chunk_slices(q.shape[-2], len(query_chunks))):
        for key_chunk, columns in zip(key_chunks, _chunk_slices(k.shape[-2], len(key_chunks))):
            kind = pair_kind(query_chunk, key_chunk)
            if kind is None:
                continue
            mask = causal_mask(rows.stop - rows.start, q.dtype) if kind == "diagonal" else None
            probabilities = scaled_scores(q[..., rows, :], k[..., columns, :], mask)
            probabilities -= log_sum_exp[..., rows, None]
            xp.exp(probabilities, out=probabilities)
            dq, dk, dv = attention_backward(q[..., rows, :], k[..., columns, :], v[..., columns, :],
                                            probabilities, grad[..., rows, :], row_dot[..., rows, :])
            grad_q[..., rows, :] += dq
            grad_kv[0][..., columns, :] += dk
            grad_kv[1][..., columns, :] += dv


# ---- ring attention --------------------------------------------------------------------------

def _pass_on(communicator, send, receive, tag):
    """Send to the next rank and receive from the previous one, in one sendrecv (the ring's direction)."""
    rank, size = communicator.rank, communicator.size
    communicator.sendrecv(send, (rank + 1) % size, receive, (rank - 1) % size, tag)


def ring_step(communicator, step, in_hand, arriving, attend, overlap):
    """Step ``step`` (0 … N-1) of the ring, on every rank at once (course exercise ring_attention).

    Rank r holds the K/V block of rank r - step in ``in_hand`` (one array, K and V stacked):
    call ``attend(owner)`` with that owner, and pass the block on, to rank r + 1, while the
    next one arrives from rank r - 1 into ``arriving`` (the same shape and dtype), tag ``KV_TAG``.
    There is nothing to pass on the last step, so N - 1 messages in all. Without ``overlap``
    attend first, then exchange (``communicator.sendrecv``); with ``overlap`` post the receive
    and the send (``irecv``, ``isend``) before attending and wait for both after, so the next
    block travels while this one is computed on. The backward runs the same steps (its dK, dV
    follow the block on the same ring), so the direction is part of the contract.
    """
    ### BEGIN SOLUTION
    rank, size = communicator.rank, communicator.size
    to_next, from_previous = (rank + 1) % size, (rank - 1) % size
    last = step == size - 1
    requests = []
    if overlap and not last:
        requests = [communicator.irecv(arriving, from_previous, KV_TAG),
                    communicator.isend(in_hand, to_next, KV_TAG)]
    attend((rank - step) % size)
    if not last and not overlap:
        communicator.sendrecv(in_hand, to_next, arriving, from_previous, KV_TAG)
    for request in requests:
        request.wait()
    ### END SOLUTION


class RingAttention(Function):
    """Causal attention of this rank's queries over the whole sequence, K/V passed around the ring.

    q, k, v: (B, H, T/N, d), this rank's tokens in ``layout`` order. Forward, step $s = 0 … N−1$:
    attend to the block of rank $r−s$ (``attend_block``), then pass it on ($N−1$ sends of K and V
    together). ``overlap`` posts the exchange before computing on the block in hand, so the
    next block is on its way meanwhile. Backward: dQ stays home; each block's dK, dV
    accumulate as it travels (the owner's own share kept aside) and go home on the last hop.
    """

    @staticmethod
    def forward(ctx, q, k, v, communicator, layout="contiguous", overlap=False, work=None):
        if not (q.shape == k.shape == v.shape) or q.ndim != 4:
            raise ShapeError(f"ring attention: q, k, v must share a (B, heads, T/N, d) shape, "
                             f"got {q.shape}, {k.shape}, {v.shape}")
        rank, size = communicator.rank, communicator.size
        check_layout(q.shape[-2] * size, size, layout)
        work = AttentionWork() if work is None else work
        blocks = xp.empty((2, 2, *k.shape), dtype=k.dtype)  # [in hand, arriving] x [K, V], preallocated
        blocks[0, 0], blocks[0, 1] = k, v
        out = xp.zeros(q.shape, dtype=q.dtype)
        log_sum_exp = xp.full(q.shape[:-1], -xp.inf, dtype=q.dtype)  # (B, H, T/N): no keys yet
        mine = chunks_of_rank(rank, size, layout)
        for step in range(size):
            in_hand = blocks[step % 2]
            ring_step(communicator, step, in_hand, blocks[(step + 1) % 2],
                      lambda owner, in_hand=in_hand: attend_block(q, in_hand[0], in_hand[1], mine,
                                                                  chunks_of_rank(owner, size, layout), out,
                                                                  log_sum_exp, work), overlap)
        ctx.save_for_backward(q, k, v, out, log_sum_exp)
        ctx.communicator, ctx.layout, ctx.overlap = communicator, layout, overlap
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, log_sum_exp = ctx.saved
        communicator, layout, overlap = ctx.communicator, ctx.layout, ctx.overlap
        rank, size = communicator.rank, communicator.size
        grad = xp.ascontiguousarray(grad)
        row_dot = (grad * out).sum(axis=-1, keepdims=True)  # rowsum(dO * O) = rowsum(dP * P)
        grad_q = xp.zeros(q.shape, dtype=q.dtype)
        blocks = xp.empty((2, 2, *k.shape), dtype=k.dtype)
        blocks[0, 0], blocks[0, 1] = k, v
        travelling = xp.zeros((2, 2, *k.shape), dtype=k.dtype)  # dK, dV of the block in hand / arriving
        own = xp.zeros((2, *k.shape), dtype=k.dtype)  # dK, dV of this rank's block from its own queries
        mine = chunks_of_rank(rank, size, layout)
        for step in range(size):
            in_hand = blocks[step % 2]
            accumulated = own if step == 0 else travelling[step % 2]
            ring_step(communicator, step, in_hand, blocks[(step + 1) % 2],
                      lambda owner, in_hand=in_hand, accumulated=accumulated: attend_block_backward(
                          (q, log_sum_exp), grad, row_dot, in_hand, mine, chunks_of_rank(owner, size, layout),
                          grad_q, accumulated), overlap)
            if step > 0:  # pass the gradient on with (after) its block; on the last step, home
                _pass_on(communicator, accumulated, travelling[(step + 1) % 2], GRAD_TAG)
        if size > 1:
            own += travelling[size % 2]  # my block's dK, dV from every other rank's queries
        return grad_q, own[0], own[1]
