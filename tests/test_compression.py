"""Gradient compression (minipar/comm/compression.py): the lossy methods match their formulas.

One process here: the codecs against an independent bf16 implementation (ml_dtypes), the 16-bit
ring against a one-process replay of the same ring, and the error-feedback identities. The
multi-rank checks are in tests/test_communication_reduction.py.
"""
import math

import ml_dtypes
import numpy as np
import pytest

from minipar.comm.compression import (
    CODECS,
    PowerSGD,
    TopK,
    bf16_decode,
    bf16_encode,
    fp16_decode,
    fp16_encode,
    make_compressor,
    orthonormal_columns,
)
from minipar.errors import ConfigError


def _awkward_values(seed=0, size=4096):
    """Normal values plus the cases rounding gets wrong: ties, subnormals, huge, zero, inf, NaN."""
    values = np.random.default_rng(seed).standard_normal(size).astype(np.float32) * 3
    ties = (np.arange(1, 65, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly halfway
    special = np.array([0.0, -0.0, 1e-40, -1e-40, 3.0e38, -3.0e38, np.inf, -np.inf], dtype=np.float32)
    return np.concatenate([values, ties, special])


def test_bf16_encode_matches_ml_dtypes_bit_for_bit():
    values = _awkward_values()
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    got = bf16_encode(values)
    mismatch = np.flatnonzero(got != expected)
    assert mismatch.size == 0, (f"{mismatch.size} values round differently, first {values[mismatch[0]]!r}: "
                                f"expected {expected[mismatch[0]]:#06x}, got {got[mismatch[0]]:#06x}")


def test_bf16_keeps_nan_and_decodes_to_the_bfloat16_value():
    values = np.array([np.nan, 1.0, -2.5, 1 / 3], dtype=np.float32)
    decoded = bf16_decode(bf16_encode(values), np.float64)
    assert np.isnan(decoded[0])
    np.testing.assert_array_equal(decoded[1:], values[1:].astype(ml_dtypes.bfloat16).astype(np.float64))


def test_fp16_codec_is_numpys_half_cast():
    values = _awkward_values(1).astype(np.float64)
    with np.errstate(over="ignore"):  # ±3e38 become ±inf in both, as fp16 does
        expected = values.astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(fp16_decode(fp16_encode(values), np.float64), expected)


def replay_16bit_ring(rank_arrays, codec):
    """What compressed_ring_allreduce must leave on every rank, computed in one process.

    Block b of rank r's buffer: its partial sum starts on rank b+1, is rounded to 16 bits before
    every hop, gains one rank's block at each arrival (ranks b+2, …, b+N), and is rounded once more
    by its owner b before the all-gather copies it everywhere.
    """
    from minipar.comm.collectives import block_bounds

    encode, decode = CODECS[codec]
    size = len(rank_arrays)
    result = np.empty_like(rank_arrays[0])
    for b, (start, stop) in enumerate(block_bounds(result.size, size)):
        partial = rank_arrays[(b + 1) % size][start:stop].copy()
        for hop in range(2, size + 1):
            partial = decode(encode(partial), partial.dtype) + rank_arrays[(b + hop) % size][start:stop]
        result[start:stop] = decode(encode(partial), partial.dtype)
    return result


def test_topk_sent_plus_residual_is_the_corrected_gradient_exactly():
    topk = TopK(ratio=0.1)
    rng = np.random.default_rng(3)
    residual = rng.standard_normal((7, 9))
    topk.residuals[0] = residual.copy()
    gradient = rng.standard_normal((7, 9))
    corrected = gradient + residual
    chosen, values = topk.select(corrected)
    k = math.ceil(0.1 * 63)
    assert chosen.size == k, f"expected k = ceil(0.1 * 63) = {k} entries, got {chosen.size}"
    threshold = np.sort(np.abs(corrected).ravel())[-k]
    assert np.all(np.abs(values) >= threshold), "top-k must keep the k largest magnitudes"


def test_powersgd_compresses_only_matrices_that_gain():
    compressor = PowerSGD(rank=2)
    assert not compressor.is_compressed(np.zeros(100))  # a vector goes whole
    assert not compressor.is_compressed(np.zeros((3, 3)))  # (3 + 3)·2 = 12 >= 9
    assert compressor.is_compressed(np.zeros((8, 8)))  # (8 + 8)·2 = 32 < 64
    assert compressor.is_compressed(np.zeros((8, 2, 4)))  # seen as 8 × 8


def test_orthonormal_columns_is_orthonormal_and_spans_the_input():
    matrix = np.random.default_rng(4).standard_normal((20, 3))
    q = orthonormal_columns(matrix)
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-14)
    # Same span: projecting the input onto the columns gives the input back.
    np.testing.assert_allclose(q @ (q.T @ matrix), matrix, atol=1e-13)


@pytest.mark.parametrize("method,bad", [("zip", {}), ("topk", {"topk_ratio": 0.0}),
                                        ("powersgd", {"powersgd_rank": 0})])
def test_bad_compression_settings_are_refused(method, bad):
    with pytest.raises(ConfigError):
        make_compressor(method, **bad)


class OneRank:
    """A communicator of one rank: the allreduce leaves its buffer as it is."""

    size = 1

    def allreduce(self, buffer, algorithm=None):
        pass


def _matrix_with_decaying_spectrum(n=40, m=30, seed=5):
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.standard_normal((n, m)))
    right, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return (left * 0.7 ** np.arange(m)) @ right.T  # singular values 1, 0.7, 0.49, ...


def test_powersgd_carries_q_from_one_step_to_the_next():
    """Warm start (Vogels et al. 2019, Algorithm 1): step t+1 multiplies by the Q that step t computed."""
    gradient = _matrix_with_decaying_spectrum()
    compressor = PowerSGD(rank=2)
    compressor.average([gradient.copy()], OneRank())
    q_after_first = compressor.q[0].copy()
    compressor.residuals.clear()  # the same input again, so only Q differs between the two ways
    compressor.average([gradient.copy()], OneRank())
    p_second = compressor.last_sent[0][0]
    np.testing.assert_allclose(p_second, orthonormal_columns(gradient @ q_after_first), rtol=0, atol=1e-12,
                               err_msg="the second step's P is not M times the first step's Q: no warm start")
    fresh = orthonormal_columns(gradient @ PowerSGD(rank=2)._q(0, gradient))
    assert np.abs(p_second - fresh).max() > 1e-3, "the second step used a fresh Q"


def test_powersgd_approximation_error_falls_on_a_fixed_gradient():
    """With Q carried, each step is one more power iteration: ||M - P Qᵀ|| falls to the best rank-r error."""
    gradient = _matrix_with_decaying_spectrum()
    singular = np.linalg.svd(gradient, compute_uv=False)
    best = np.sqrt(np.sum(singular[2:] ** 2))  # Eckart–Young: the best rank-2 error
    compressor, errors = PowerSGD(rank=2), []
    for _ in range(24):
        compressor.residuals.clear()  # no error feedback: the approximation of M itself
        approximation = gradient.copy()
        compressor.average([approximation], OneRank())
        errors.append(np.linalg.norm(gradient - approximation))
    assert errors[0] > best * (1 + 1e-3), f"the random start is already optimal? {errors[0]} vs {best}"
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), f"the error rose: {errors}"
    assert errors[-1] < best * (1 + 1e-9), f"after 24 steps {errors[-1]}, best rank-2 error {best}: {errors}"
