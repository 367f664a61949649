"""Cutting communication on real ranks: each lossy method matches its formulas, each exact one is exact.

Rank bodies are in tests/mpi_bodies/compression_body.py (collective level) and
tests/mpi_bodies/communication_training_body.py (the Trainer); they return values, pytest compares.
"""
import pytest

from minipar.testing import results_from_ranks

BODY = "tests.mpi_bodies.compression_body"


def _each_rank(results, key):
    return {rank: result[key] for rank, result in enumerate(results)}


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_16bit_ring_is_the_replayed_ring_and_moves_half_the_bytes(nranks, codec):
    results = results_from_ranks(nranks, f"{BODY}:sixteen_bit_ring", codec=codec)
    assert _each_rank(results, "bitwise_equal_to_replay") == {r: True for r in range(nranks)}, (
        f"largest difference from the one-process replay per rank: {_each_rank(results, 'max_difference_from_replay')}")
    # The ring's own byte count at 2 bytes per value (collectives.modelled_traffic).
    assert _each_rank(results, "bytes_sent") == _each_rank(results, "expected_bytes_sent")
    # Rounding is bounded: N hops of a relative 16-bit rounding on values of size ~3·sqrt(N).
    unit = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[codec]
    for rank, error in _each_rank(results, "max_error_vs_exact_mean").items():
        assert error <= 4 * 4 * nranks * unit, f"rank {rank}: error {error} vs exact mean exceeds the bound"


@pytest.mark.parametrize("nranks", [2, 4, 8])
def test_topk_error_feedback_identity_and_bytes(nranks):
    results = results_from_ranks(nranks, f"{BODY}:topk_identities")
    assert _each_rank(results, "identity_exact") == {r: True for r in range(nranks)}, "sent + residual != g + e"
    assert _each_rank(results, "mean_exact") == {r: True for r in range(nranks)}, "result != mean of what was sent"
    assert _each_rank(results, "allgather_elements") == _each_rank(results, "expected_allgather_elements")
    assert _each_rank(results, "bytes_sent") == _each_rank(results, "expected_bytes_sent")


@pytest.mark.parametrize("nranks", [2, 4, 8])
def test_powersgd_identities_and_two_small_allreduces(nranks):
    results = results_from_ranks(nranks, f"{BODY}:powersgd_identities")
    for rank, result in enumerate(results):
        # float64: each identity holds to a few roundings of the values involved.
        assert result["orthonormality"] < 1e-13, f"rank {rank}: |PᵀP − I| = {result['orthonormality']}"
        assert result["identity"] < 1e-13, f"rank {rank}: |P Qᵀ + e − M| / |M| = {result['identity']}"
        assert result["q_mean"] < 1e-13, f"rank {rank}: |Q − mean Mᵀ P| / |Q| = {result['q_mean']}"
        assert (result["allreduce_calls"], result["allreduce_elements"]) == (2, result["expected_allreduce_elements"]), (
            f"rank {rank}: expected 2 allreduces of (n+m)r values plus the vector")


@pytest.mark.parametrize("nranks,ranks_per_node", [(2, 1), (4, 2), (8, 2), (8, 4)])
def test_hierarchical_allreduce_is_exact_and_crosses_nodes_less(nranks, ranks_per_node):
    results = results_from_ranks(nranks, f"{BODY}:hierarchical_versus_flat", ranks_per_node=ranks_per_node)
    assert _each_rank(results, "bitwise_equal_integer_data") == {r: True for r in range(nranks)}
    for rank, difference in _each_rank(results, "relative_difference_real_data").items():
        assert difference < 1e-14, f"rank {rank}: hierarchical vs flat on random data differ by {difference}"
    n_bytes, nodes = 1000 * 8, nranks // ranks_per_node
    flat = sum(_each_rank(results, "flat_inter_node_bytes").values())
    hierarchical = sum(_each_rank(results, "hierarchical_inter_node_bytes").values())
    assert flat == nodes * 2 * (nranks - 1) / nranks * n_bytes, f"flat ring: {flat} bytes crossed nodes"
    assert hierarchical == 2 * (nodes - 1) * n_bytes, f"hierarchical: {hierarchical} bytes crossed nodes"
    assert sum(_each_rank(results, "is_leader").values()) == nodes


TRAINING = "tests.mpi_bodies.communication_training_body"


@pytest.mark.parametrize("nranks,layout", [(2, {}), (4, {}), (8, {}), (4, {"tp": 2}), (8, {"tp": 2, "pp": 2})])
def test_local_sgd_with_h1_and_sgd_is_data_parallelism(nranks, layout):
    dp = nranks // (layout.get("tp", 1) * layout.get("pp", 1))
    results = results_from_ranks(nranks, f"{TRAINING}:local_sgd_h1_is_data_parallelism", dp=dp, **layout)
    for rank, result in enumerate(results):
        # (1/N) Σ (θ − η g_i) and θ − η (1/N) Σ g_i: the same in exact arithmetic, rounded differently.
        assert result["local_sgd_losses"] == pytest.approx(result["data_parallel_losses"], rel=1e-12, abs=0), rank
    assert results[0]["largest_relative_parameter_difference"] < 1e-12


@pytest.mark.parametrize("nranks", [2, 4])
def test_local_sgd_replicas_drift_between_averages_and_meet_at_them(nranks):
    period, steps = 3, 7
    results = results_from_ranks(nranks, f"{TRAINING}:local_sgd_replicas_drift_and_meet", period=period, steps=steps)
    assert results[0]["averaging_steps"] == [2, 5]
    for step in range(steps):
        values = {result["checksums"][step] for result in results}
        if step in (2, 5):
            assert len(values) == 1, f"step {step}: replicas must agree right after an average, got {values}"
        else:
            assert len(values) == nranks, f"step {step}: replicas on their own data must differ, got {values}"
    for rank, result in enumerate(results):  # one parameter average per period (the buckets of one allreduce each)
        assert result["allreduce_calls"] == 2 * results[0]["allreduce_calls"] // 2, rank


@pytest.mark.parametrize("method", ["fp16", "bf16", "topk", "powersgd"])
def test_compressed_training_keeps_replicas_identical_and_sends_less(method):
    results = results_from_ranks(2, f"{TRAINING}:compressed_training", method=method)
    for step in range(3):
        assert len({result["checksums"][step] for result in results}) == 1, f"replicas differ after step {step}"
    for rank, result in enumerate(results):
        assert result["bytes_sent"] < result["exact_bytes_sent"], (rank, result["bytes_sent"], result["exact_bytes_sent"])
        # The first step's loss is computed before any update: compression cannot change it.
        assert result["losses"][0] == result["exact_losses"][0], rank
        expected_state = {"fp16": [], "bf16": []}.get(method)
        if expected_state is not None:
            assert result["state_names"] == expected_state, rank
        else:
            assert any(name.startswith("residual.") for name in result["state_names"]), rank


@pytest.mark.parametrize("options", [{"compress": "topk", "topk_ratio": 0.1}, {"compress": "powersgd"},
                                     {"local_sgd": 4}], ids=["topk", "powersgd", "local_sgd"])
def test_resume_carries_the_per_rank_state_exactly(options, tmp_path):
    results = results_from_ranks(2, f"{TRAINING}:resume_is_exact", folder=str(tmp_path / "ckpt"), dp=2, **options)
    for rank, result in enumerate(results):
        assert result["sync_state"], f"rank {rank}: no per-rank state to carry"
        # Bit for bit: the residuals / replicas saved at step 3 are the ones the straight run had.
        assert result["resumed"] == result["straight"], (rank, result["resumed"], result["straight"])
