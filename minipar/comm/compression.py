r"""Gradient compression: fewer bytes per data-parallel step, paid for in exactness.

Plain data parallelism moves $2\frac{N-1}{N} n$ values per step through a ring allreduce. Three ways
to move less, each a small piece below, each trading something different:

16-bit exchange (``HalfPrecision``: fp16 or bf16). Every message of the ring carries 16-bit
numbers, so the bytes halve (fp32 gradients) or quarter (fp64). Sums are still formed in the
gradient's own precision, but each partial sum is rounded to 16 bits before the next hop, so the
result differs from the exact mean by a few 16-bit roundings. fp16 keeps 10 mantissa bits and a
narrow range (overflow above 65504); bf16 keeps fp32's 8 exponent bits and 7 mantissa bits, so it
never overflows where fp32 would not, but is coarser. NumPy has no bf16, so it is emulated on the
fp32 bit pattern: round to nearest even at bit 16 and keep the high 16 bits (``bf16_encode``).
(Micikevicius et al. 2018 for fp16 training; Kalamkar et al. 2019 for bf16.)

Top-k with error feedback (``TopK``). Each rank sends only its k largest-magnitude entries of
g + e as (index, value) pairs, 2k numbers instead of n, gathered from every rank and summed into
a dense buffer. What was not sent is kept as the residual e and added to the next step's
gradient, so nothing is lost, only delayed: $\text{sent} + e_\text{new} = g + e_\text{old}$ exactly (Seide et al. 2014,
"1-bit SGD"; Stich et al. 2018; Karimireddy et al. 2019, "Error feedback fixes SignSGD").

PowerSGD (``PowerSGD``, Vogels et al. 2019). A gradient matrix $M$ ($n \times m$) is replaced by a
rank-$r$ product $P Q^\top$ found by one step of power iteration, warm-started from last step's $Q$:

$$
\begin{aligned}
P &= M Q && \text{allreduce (mean) } P\text{: } n r \text{ numbers} \\
P &\leftarrow \operatorname{orthonormalise}(P) \\
Q &= M^\top P && \text{allreduce (mean) } Q\text{: } m r \text{ numbers} \\
M &\approx P Q^\top, \quad e = M - P Q^\top && \text{error feedback: } M = \text{gradient} + \text{old } e
\end{aligned}
$$

$(n + m) r$ numbers instead of $n m$; vectors (biases, norm gains) and matrices too small to gain are
sent whole, inside the first allreduce. All ranks hold the same P and Q after the allreduces, so
they apply the same approximation and replicas stay identical.

Every compressor keeps its state (residuals, Q) in ``state_arrays()`` so a checkpoint can carry it.
"""
import math

import numpy as _host  # the shared random start of Q is drawn on the host; errstate quiets fp16's inf

from minipar.backend import from_host, xp
from minipar.comm.collectives import ring_all_gather, ring_reduce_scatter
from minipar.comm.traffic import Traffic, block_bounds
from minipar.errors import ConfigError

COMPRESSION_METHODS = ("none", "fp16", "bf16", "topk", "powersgd")


# ---- 16-bit codecs: values <-> uint16 words on the wire ------------------------------------------
def fp16_encode(values):
    """IEEE half precision, round to nearest even (NumPy's cast), as raw 16-bit words.

    Beyond ±65504 the cast gives ±inf, as fp16 hardware does: that is fp16's range, not an error.
    """
    with _host.errstate(over="ignore"):
        return values.astype(xp.float16).view(xp.uint16)


def fp16_decode(words, dtype):
    return words.view(xp.float16).astype(dtype)


def bf16_encode(values):
    """bfloat16 = the high 16 bits of the fp32 pattern, rounded to nearest even.

    Adding 0x7FFF plus the lowest kept bit before the shift rounds ties to even; NaN is kept NaN
    by forcing a mantissa bit.
    """
    bits = xp.ascontiguousarray(values, dtype=xp.float32).view(xp.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    rounded = xp.where(xp.isnan(values), bits | 0x00400000, rounded)
    return (rounded >> 16).astype(xp.uint16)


def bf16_decode(words, dtype):
    return (words.astype(xp.uint32) << 16).view(xp.float32).astype(dtype)


CODECS = {"fp16": (fp16_encode, fp16_decode), "bf16": (bf16_encode, bf16_decode)}


def fp16_ring_allreduce(mpi_comm, buffer, op="sum"):
    """``Communicator.allreduce(..., algorithm="ring_fp16")``: the ring with fp16 messages."""
    return compressed_ring_allreduce(mpi_comm, buffer, "fp16", op)


def bf16_ring_allreduce(mpi_comm, buffer, op="sum"):
    """``Communicator.allreduce(..., algorithm="ring_bf16")``: the ring with bf16 messages."""
    return compressed_ring_allreduce(mpi_comm, buffer, "bf16", op)


def compressed_ring_allreduce(mpi_comm, buffer, codec, op="sum"):
    """Ring allreduce (sum) of a backend array whose every message is 16-bit, in place; returns Traffic.

    The ring of ``collectives.ring_allreduce`` with one change, made on the wire: the
    reduce-scatter is ``collectives.ring_reduce_scatter`` itself, handed a communicator that
    encodes each block before its hop and decodes it on arrival (``_EncodedWire``), so the sum
    is still formed in the buffer's precision. After the reduce-scatter each rank rounds its
    finished block once more and the all-gather moves the rounded words, so every rank ends
    with the same values. Bytes: $2(N−1)/N · n · 2$ per rank.
    """
    if op != "sum":
        raise ConfigError(f"the 16-bit ring only sums, got op={op!r}")
    encode, decode = CODECS[codec]
    flat = buffer.reshape(-1)
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    wire = _EncodedWire(mpi_comm, encode, decode)
    ring_reduce_scatter(wire, flat)
    words = xp.empty(flat.size, dtype=xp.uint16)
    own_start, own_stop = block_bounds(flat.size, size)[rank]
    words[own_start:own_stop] = encode(flat[own_start:own_stop])
    traffic = wire.traffic + ring_all_gather(mpi_comm, words)
    flat[...] = decode(words, flat.dtype)
    return traffic


class _EncodedWire:
    """A communicator whose messages travel as 16-bit words: a send encodes its buffer, a receive
    decodes into the caller's buffer. Counts what really moved in ``traffic``.

    It offers what a ring needs (Send, Recv, Sendrecv, Isend, and Irecv whose request is
    completed with its own Wait or wait); everything else is the communicator's own.
    """

    def __init__(self, comm, encode, decode):
        self._comm, self._encode, self._decode, self.traffic = comm, encode, decode, Traffic()

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def _words(self, array):
        words = self._encode(array.reshape(-1))
        self.traffic += Traffic(words.nbytes, 0)
        return words

    def _arrived(self, words, out):
        out.reshape(-1)[...] = self._decode(words, out.dtype)
        self.traffic += Traffic(0, words.nbytes)

    def Send(self, buf, dest, tag=0):
        self._comm.Send(self._words(buf), dest, tag)

    # ``status`` is passed on only when given: the GPU transports' wires take none (comm/transport.py).
    def Recv(self, buf, source, tag=0, status=None):
        words = xp.empty(buf.size, dtype=xp.uint16)
        self._comm.Recv(words, source, tag, *(() if status is None else (status,)))
        self._arrived(words, buf)

    def Sendrecv(self, sendbuf, dest, sendtag=0, recvbuf=None, source=0, recvtag=0, status=None):
        words = xp.empty(recvbuf.size, dtype=xp.uint16)
        self._comm.Sendrecv(self._words(sendbuf), dest, sendtag, words, source, recvtag,
                            *(() if status is None else (status,)))
        self._arrived(words, recvbuf)

    def Isend(self, buf, dest, tag=0):
        words = self._words(buf)
        return _Decoding(self._comm.Isend(words, dest, tag), words, None, None)

    def Irecv(self, buf, source, tag=0):
        words = xp.empty(buf.size, dtype=xp.uint16)
        return _Decoding(self._comm.Irecv(words, source, tag), words, buf, self)


class _Decoding:
    """A request of ``_EncodedWire``: keeps the words alive, and decodes a receive when it completes."""

    def __init__(self, request, words, out, wire):
        self.request, self.words, self.out, self.wire = request, words, out, wire

    def Wait(self, status=None):
        self.request.Wait(status)
        if self.out is not None:
            self.wire._arrived(self.words, self.out)
            self.out = None

    wait = Wait


# ---- the compressors: each averages a list of gradient arrays over the communicator ------------
class HalfPrecision:
    """fp16 or bf16 exchange. Stateless: no error feedback (the rounding is unbiased enough)."""

    def __init__(self, codec):
        self.codec = codec

    def average(self, gradients, comm):
        """Replace each array in ``gradients`` (a list, any shapes) by its mean over ``comm``."""
        _allreduce_mean(gradients, comm, algorithm=f"ring_{self.codec}")

    def state_arrays(self):
        return {}

    def load_state_arrays(self, arrays):
        pass


class TopK:
    """Top-k sparsification with error feedback; $k = ⌈r·n⌉$ per gradient array of $n$
    elements, $r$ the ``ratio``."""

    def __init__(self, ratio):
        if not 0 < ratio <= 1:
            raise ConfigError(f"top-k ratio must be in (0, 1], got {ratio!r}")
        self.ratio = ratio
        self.residuals = {}  # index of the gradient in the list -> residual e (gradient's shape)
        self.last_sent = {}  # index -> the dense array this rank sent (for the identity checks)

    def average(self, gradients, comm):
        for index, gradient in enumerate(gradients):
            corrected = gradient + self.residuals.get(index, 0)  # g + e
            chosen, values = self.select(corrected)
            sent = xp.zeros_like(corrected).reshape(-1)
            sent[chosen] = values
            self.residuals[index] = corrected - sent.reshape(corrected.shape)  # exact: x - x = 0, x - 0 = x
            self.last_sent[index] = sent.reshape(corrected.shape)
            gradient[...] = self._sum_sparse(chosen, values, corrected.size, comm).reshape(gradient.shape)

    def select(self, corrected):
        """Indices (int64, ascending) and values of k largest |entries| (a partial sort: O(n), not O(n lg n))."""
        flat = corrected.reshape(-1)
        k = math.ceil(self.ratio * flat.size)
        chosen = xp.sort(xp.argpartition(-xp.abs(flat), k - 1)[:k])
        return chosen, flat[chosen]

    @staticmethod
    def _sum_sparse(chosen, values, size, comm):
        """All-gather every rank's (index, value) pairs and add them into a dense mean."""
        all_indices = xp.empty(comm.size * chosen.size, dtype=chosen.dtype)
        all_values = xp.empty(comm.size * values.size, dtype=values.dtype)
        comm.allgather(chosen, all_indices)
        comm.allgather(values, all_values)
        dense = xp.zeros(size, dtype=values.dtype)
        xp.add.at(dense, all_indices, all_values)  # same order on every rank: identical replicas
        return dense / comm.size

    def state_arrays(self):
        return {f"residual.{i}": e for i, e in self.residuals.items()}

    def load_state_arrays(self, arrays):
        self.residuals = {int(name.split(".")[1]): from_host(a) for name, a in arrays.items()}


class PowerSGD:
    """Rank-r PowerSGD with error feedback and warm start (Vogels et al. 2019, Algorithm 1)."""

    def __init__(self, rank, seed=0):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"PowerSGD rank must be a positive integer, got {rank!r}")
        self.rank, self.seed = rank, seed
        self.residuals, self.q = {}, {}  # by index of the gradient in the list
        self.last_sent = {}

    def is_compressed(self, gradient):
        """Matrices (leading axis × the rest) for which (n + m) r < n m; everything else goes whole."""
        if gradient.ndim < 2:
            return False
        n, m = gradient.shape[0], gradient.size // gradient.shape[0]
        return (n + m) * self.rank < n * m

    def average(self, gradients, comm):
        matrices = [i for i, g in enumerate(gradients) if self.is_compressed(g)]
        whole = [i for i in range(len(gradients)) if i not in set(matrices)]
        corrected = {i: self._as_matrix(gradients[i]) + self.residuals.get(i, 0) for i in matrices}
        ps = {i: corrected[i] @ self._q(i, corrected[i]) for i in matrices}  # P = M Q   (n, r)
        _allreduce_mean([ps[i] for i in matrices] + [gradients[i] for i in whole], comm)
        for i in matrices:
            ps[i] = orthonormal_columns(ps[i])
            self.q[i] = corrected[i].T @ ps[i]  # Q = Mᵀ P   (m, r)
        _allreduce_mean([self.q[i] for i in matrices], comm)
        for i in matrices:
            approximation = ps[i] @ self.q[i].T
            self.residuals[i] = corrected[i] - approximation
            self.last_sent[i] = (ps[i], self.q[i])
            gradients[i][...] = approximation.reshape(gradients[i].shape)

    @staticmethod
    def _as_matrix(gradient):
        return gradient.reshape(gradient.shape[0], -1)

    def _q(self, index, matrix):
        """Last step's Q (warm start), or the same seeded Gaussian start on every rank."""
        if index not in self.q:
            generator = _host.random.default_rng((self.seed, index))
            start = generator.standard_normal((matrix.shape[1], self.rank))
            self.q[index] = from_host(start).astype(matrix.dtype)
        return self.q[index]

    def state_arrays(self):
        arrays = {f"residual.{i}": e for i, e in self.residuals.items()}
        arrays.update({f"q.{i}": q for i, q in self.q.items()})
        return arrays

    def load_state_arrays(self, arrays):
        for name, array in arrays.items():
            kind, index = name.split(".")
            (self.residuals if kind == "residual" else self.q)[int(index)] = from_host(array)


def orthonormal_columns(matrix):
    """Gram–Schmidt through QR: columns orthonormal, spanning the same space (same on every rank)."""
    q, r = xp.linalg.qr(matrix)
    return q * xp.where(xp.diag(r) < 0, -1.0, 1.0)  # fix QR's sign freedom so the result is unique


def make_compressor(method, *, topk_ratio=0.01, powersgd_rank=2, seed=0):
    if method not in COMPRESSION_METHODS:
        raise ConfigError(f"compression must be one of {COMPRESSION_METHODS}, got {method!r}")
    if method in CODECS:
        return HalfPrecision(method)
    if method == "topk":
        return TopK(topk_ratio)
    if method == "powersgd":
        return PowerSGD(powersgd_rank, seed)
    return None


def _allreduce_mean(arrays, comm, algorithm="ring"):
    """One allreduce (sum) of the arrays packed together, then / N, unpacked in place.

    The hand-built rings reduce each block on one rank and copy it, so every rank gets bitwise the
    same result, which keeps the replicas identical.
    """
    if not arrays:
        return
    flat = xp.concatenate([a.reshape(-1) for a in arrays])
    comm.allreduce(flat, algorithm=algorithm)
    _unpack(flat / comm.size, arrays)


def _unpack(flat, arrays):
    offset = 0
    for array in arrays:
        array[...] = flat[offset:offset + array.size].reshape(array.shape)
        offset += array.size
