"""Checks for ring attention (minipar/parallel/context_parallel.py): the log-sum-exp merge
(``merge_partials``) and one step of the ring (``ring_step``).

The merge, on one process: partial results of softmax attention over parts of the keys merge
into the softmax over their union (Milakov & Gimelshein 2018; Liu et al. 2023): the oracle is
softmax attention over all the keys at once, in NumPy. Three parts in a row (the running
result starts with $l = −∞$, "no keys yet"), logits shifted by +1000 (exp overflows without the
max shift), shapes (T, d) and (B, H, T, d), float64 at 1e-12 and float32 kept float32.

The ring, on $N$ = 1, 2, 3, 4 and 8 ranks: ``RingAttention`` (which runs the student's
``ring_step``) on each rank's tokens, contiguous and zigzag, overlap off and on, equals causal
attention over the whole sequence computed in NumPy on every rank, output and dQ, dK, dV, in
float64 at 1e-12; a float32 run keeps float32. Contract, read from a ``Spy`` under the
Communicator: no collective; forward sends $N − 1$ K/V messages, each one whole block (K and V,
$2·B·H·(T/N)·d$ elements) in its own dtype, all to rank $r + 1$, received from rank $r − 1$ (the
backward's dK, dV follow the blocks on that ring). Sends are synchronous, so an order that needs
MPI to buffer (every rank sending before it receives) deadlocks here and ends at the short limit.
"""
import math

import numpy as np

from minipar.course.checking import Check, CheckFailure, agreed, compare, require
from minipar.course.spy import spy_on

LIMIT = 12.0


def _oracle_attention(q, k, v, query_positions, key_positions):
    """Softmax attention in NumPy, masked where a key's position is after the query's: (out, lse)."""
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if query_positions is not None:
        scores = np.where(key_positions[None, :] > query_positions[:, None], -np.inf, scores)
    top = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    return (weights / total) @ v, (top + np.log(total))[..., 0]


def check_merge(comm):
    from minipar.parallel.context_parallel import merge_partials

    rng = np.random.default_rng(23)
    for shape, shift, dtype in (((5, 3), 0.0, np.float64), ((2, 2, 4, 3), 1000.0, np.float64),
                                ((2, 3, 4), 0.0, np.float32)):
        rows, width = shape[:-1], shape[-1]
        q = rng.standard_normal((*rows[:-1], rows[-1], width))
        k, v = rng.standard_normal((2, *rows[:-1], 9, width))
        q[..., 0] += shift / 5   # scores above +1000 for some rows: exp overflows without the max shift
        k[..., 0] += 10
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        out = np.zeros(q.shape, dtype=dtype)
        log_sum_exp = np.full(q.shape[:-1], -np.inf, dtype=dtype)
        what = f"merge_partials ({np.dtype(dtype).name}, out of shape {q.shape}{', logits near +1000' if shift else ''})"
        tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
        for part, columns in enumerate((slice(0, 2), slice(2, 7), slice(7, 9))):
            as64 = [array.astype(np.float64) for array in (q, k[..., columns, :], v[..., columns, :])]
            partial, partial_lse = _oracle_attention(*as64, None, None)
            returned = merge_partials(out, log_sum_exp, partial.astype(dtype), partial_lse.astype(dtype))
            require(returned is None or returned is out or isinstance(returned, tuple),
                    f"{what} returned {type(returned).__name__}; it updates out and log_sum_exp in place")
            require(out.dtype == dtype and log_sum_exp.dtype == dtype,
                    f"{what} changed the dtype of out or log_sum_exp (now {out.dtype}, {log_sum_exp.dtype})")
            keys = slice(0, columns.stop)
            expected, expected_lse = _oracle_attention(q.astype(np.float64), k[..., keys, :].astype(np.float64),
                                                       v[..., keys, :].astype(np.float64), None, None)
            where = f"{what}, after merging part {part + 1} of 3 (keys 0:{columns.stop})"
            compare(f"{where}: log_sum_exp, element", log_sum_exp, expected_lse,
                    "l = m + log(exp(l1 − m) + exp(l2 − m)), m = max(l1, l2): log Σ exp over every key so far",
                    **tolerance)
            compare(f"{where}: out, element", out, expected,
                    "o = exp(l1 − l)·o1 + exp(l2 − l)·o2: softmax attention over every key so far", **tolerance)


def _ring_case(comm, layout, overlap, dtype):
    from minipar.backend import set_default_dtype, xp
    from minipar.comm import Communicator
    from minipar.parallel.context_parallel import RingAttention, token_positions
    from minipar.tensor import Tensor

    set_default_dtype(xp.float64)
    communicator = Communicator(comm)
    rank, size = communicator.rank, communicator.size
    batch, heads, width = 2, 2, 3
    length = 4 * size
    rng = np.random.default_rng(7)
    q, k, v, upstream = rng.standard_normal((4, batch, heads, length, width))
    positions = np.asarray(token_positions(rank, size, length, layout))
    mine = [Tensor(array[..., positions, :].astype(dtype), requires_grad=True) for array in (q, k, v)]
    spy = spy_on(communicator, synchronous=True)
    what = f"ring attention ({layout}, overlap {'on' if overlap else 'off'}, {np.dtype(dtype).name}, N = {size})"
    try:
        out = RingAttention.apply(*mine, communicator, layout, overlap, None)
    except (CheckFailure, NotImplementedError):
        raise
    except Exception as error:  # noqa: BLE001 - the student's code may raise anything: name the case
        from minipar.course.runner import _where

        lines = str(error).strip().splitlines() or [""]
        raise CheckFailure(f"rank {rank}: {what} raised {type(error).__name__}: {lines[-1].strip()}"
                           f"{_where(error)}") from error
    forward_calls = list(spy.calls)
    out.backward(upstream[..., positions, :].astype(dtype))
    require(np.asarray(out.data).dtype == dtype, f"rank {rank}: {what}: the output is {np.asarray(out.data).dtype}")
    _ring_contract(forward_calls, what, rank, size, 2 * batch * heads * (length // size) * width, dtype)
    if dtype != np.float64:
        return
    whole = np.arange(length)
    expected, _ = _oracle_attention(q, k, v, whole, whole)
    compare(f"rank {rank}: {what}: output, element", np.asarray(out.data), expected[..., positions, :],
            "causal softmax attention over the whole sequence, at this rank's positions")
    probabilities = np.exp(q @ np.swapaxes(k, -1, -2) / math.sqrt(width)
                           - _oracle_attention(q, k, v, whole, whole)[1][..., None])
    probabilities = np.where(whole[None, :] > whole[:, None], 0.0, probabilities)
    grad_p = upstream @ np.swapaxes(v, -1, -2)
    grad_s = probabilities * (grad_p - (grad_p * probabilities).sum(axis=-1, keepdims=True)) / math.sqrt(width)
    grads = {"dQ": grad_s @ k, "dK": np.swapaxes(grad_s, -1, -2) @ q, "dV": np.swapaxes(probabilities, -1, -2) @ upstream}
    for (name, expected_grad), tensor in zip(grads.items(), mine, strict=True):
        compare(f"rank {rank}: {what}: {name}, element", np.asarray(tensor.grad), expected_grad[..., positions, :],
                "the gradient of causal attention over the whole sequence, at this rank's positions "
                "(dK, dV travel home on the same ring as K and V)")


def _ring_contract(calls, what, rank, size, elements, dtype):
    used = sorted({call.method for call in calls if call.direction == "collective"})
    require(not used, f"rank {rank}: {what} called MPI's {', '.join(used)}: the ring passes K/V with point-to-point "
                      "messages only")
    sends = [call for call in calls if call.direction == "send"]
    receives = [call for call in calls if call.direction == "recv"]
    require(len(sends) == size - 1 and len(receives) == size - 1,
            f"rank {rank}: {what} sent {len(sends)} and received {len(receives)} messages in forward; the ring passes "
            f"the K/V block on N − 1 = {size - 1} times (nothing to pass on the last step)")
    for call in sends + receives:
        peer = (rank + 1) % size if call.direction == "send" else (rank - 1) % size
        way = "to" if call.direction == "send" else "from"
        require(call.peer == peer, f"rank {rank}: {what}: a K/V message {way} rank {call.peer}; the block goes to "
                                   f"rank r + 1 = {(rank + 1) % size} and the next comes from r − 1 = "
                                   f"{(rank - 1) % size} (the backward's dK, dV follow on that ring)")
        require(call.elements == elements and call.dtype == np.dtype(dtype).name,
                f"rank {rank}: {what}: a message of {call.elements} {call.dtype} elements ({call.method}); each is "
                f"the whole block in hand, K and V together: {elements} {np.dtype(dtype).name} elements")


def check_ring(comm):
    for layout in ("contiguous", "zigzag"):
        for overlap in (False, True):
            agreed(comm, _ring_case, comm, layout, overlap, np.float64)
    agreed(comm, _ring_case, comm, "zigzag", True, np.float32)


RING_ATTENTION = [
    Check("merge_partials: 3 parts in a row, logits near +1000, float64 and float32", (1,), check_merge),
    Check("ring attention vs the whole sequence: contiguous/zigzag, overlap off/on, forward and backward",
          (1, 2, 3, 4, 8), check_ring, limit=LIMIT),
]
