"""ZeRO (minipar/parallel/zero.py): parts and padding, memory per rank against the paper's
formulas re-derived for fp32 AdamW, traffic per step from the communicator counters, ZeRO with
dp = 1, and the checkpoint arrays of every stage. That every stage trains exactly like one
process is in tests/test_equivalence.py (test_every_layout_with_zero_equals_single_process).
"""
import pytest

from minipar.backend import xp
from minipar.errors import ConfigError
from minipar.parallel.gradient_sync import bytes_held
from minipar.parallel.zero import Unit, part_length
from minipar.testing import results_from_ranks
from minipar.train import TrainConfig
from tests.mpi_bodies.comparisons import assert_as_expected


class _Sized:
    def __init__(self, size):
        self.size = size


def test_part_length_pads_to_whole_parts():
    assert [part_length(n, 4) for n in (1, 4, 5, 8, 225)] == [1, 1, 2, 2, 57]
    assert all(part_length(n, count) * count >= n > (part_length(n, count) - 1) * count
               for n in range(1, 50) for count in range(1, 9))


def test_unit_places_parts_side_by_side():
    unit = Unit([_Sized(5), _Sized(8), _Sized(1)], count=4)
    assert unit.places == [slice(0, 2), slice(2, 4), slice(4, 5)] and unit.length == 5


def test_bytes_held_counts_each_buffer_once():
    base = xp.zeros(100, dtype=xp.float32)
    assert bytes_held([base[:10], base[50:].reshape(5, 10), None]) == 400
    assert bytes_held([base, xp.zeros(3, dtype=xp.float64)]) == 424


def test_zero_refuses_options_of_plain_data_parallelism_but_overlaps():
    assert TrainConfig(dp=2, zero=2, overlap=True).overlap  # reduce-scatters start during backward
    with pytest.raises(ConfigError, match="ZeRO"):
        TrainConfig(dp=2, zero=1, allreduce="ring")
    with pytest.raises(ConfigError, match="zero must be"):
        TrainConfig(zero=4)


def test_memory_and_traffic_follow_the_formulas():
    results = results_from_ranks(4, "tests.mpi_bodies.zero_body:check_memory_and_traffic", timeout=300)
    assert_as_expected(results, checks=["{'dp': 4}", "{'dp': 2, 'pp': 2}"])


def test_stages_2_and_3_keep_a_part_of_the_gradients_with_micro_batches():
    results = results_from_ranks(2, "tests.mpi_bodies.zero_body:check_gradient_memory_with_micro_batches",
                                 timeout=300)
    assert_as_expected(results, checks=["micro-batches"])


def test_stage_3_keeps_no_gathered_parameter_alive():
    results = results_from_ranks(2, "tests.mpi_bodies.zero_body:check_stage_3_frees_gathered_parameters", timeout=120)
    assert_as_expected(results, checks=["stage 3 frees"])


def test_stage_3_recomputes_with_the_same_dropout_masks():
    results = results_from_ranks(2, "tests.mpi_bodies.zero_body:check_stage_3_replays_dropout", timeout=120)
    assert_as_expected(results, checks=["stage 3 dropout"])


def test_zero_with_one_data_parallel_rank_has_no_effect_and_says_so():
    results = results_from_ranks(4, "tests.mpi_bodies.zero_body:check_without_data_parallelism", timeout=120)
    assert_as_expected(results, checks=["dp 1"])
    assert results.output.count("note: --zero 2 with dp = 1 has no effect") == 1, results.output


def test_checkpoint_arrays_agree_across_stages_and_resume_any_stage():
    results = results_from_ranks(4, "tests.mpi_bodies.zero_body:check_checkpoint_arrays", timeout=300)
    assert_as_expected(results, checks=["{'dp': 2, 'pp': 2, 'microbatches': 2}",
                                        "{'dp': 2, 'tp': 2, 'sequence_parallel': True}"])
