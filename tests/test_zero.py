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


# ---- the gradient copies, in one process: a stand-in dp group whose ranks all hold this process's gradients ----
# N = 4 cuts the tied embedding (16 x 15 = 240 numbers, a unit of its own) without padding and every
# other parameter (15, 45 x 15, ...) with some, so both ways of building the reduce-scatter input run.
COPIES = dict(vocab_size=16, block_size=6, n_layer=2, n_head=3, n_embd=15)


class _Done:
    def test(self):
        return True

    def wait(self):
        pass


class _AlikeRanks:
    """Rank ``rank`` of ``size`` dp ranks whose gradients all equal this process's: a reduce-scatter
    sums ``size`` equal contributions, so the average is this rank's part of its own gradient. It
    keeps each receive buffer it filled."""

    def __init__(self, size, rank):
        self.size, self.rank, self.received = size, rank, []

    def reduce_scatter(self, send, out):
        out[...] = send.reshape(self.size, -1)[self.rank] * self.size
        self.received.append(out)

    def ireduce_scatter(self, send, out):
        self.reduce_scatter(send, out)
        return _Done()


def _zero_on_alike_ranks(stage, overlap, size=4, rank=1):
    """(zero, comm, chunk, {id(p): its full gradient of one batch}) for the COPIES model in float64."""
    from minipar.nn.gpt import GPT, GPTConfig
    from minipar.parallel.pipeline.partition import partition
    from minipar.parallel.sharding import label_replicated
    from minipar.parallel.zero import Zero
    config = GPTConfig(**COPIES)
    chunk = partition(label_replicated(GPT(config, dtype="float64")).pieces(), 1, 0)[0]
    tokens = xp.asarray(xp.arange(2 * 7).reshape(2, 7) % config.vocab_size)
    batch = (tokens[:, :-1].copy(), tokens[:, 1:].copy())
    chunk(*batch).backward()
    full = {id(p): p.grad.copy() for p in chunk.parameters()}
    for p in chunk.parameters():
        p.grad = None
    comm = _AlikeRanks(size, rank)
    zero = Zero([chunk], comm, stage, overlap=overlap)
    return zero, comm, chunk, batch, full


def test_gradient_rows_copy_each_gradient_once_into_the_rank_major_buffer():
    """The reduce-scatter input of each unit is ``_rows`` of each gradient side by side, built with
    no temporary (the only allocation is the buffer itself) and, for a unit of one parameter that N
    divides, with no copy at all (the buffer is that gradient)."""
    import tracemalloc
    zero, _, _, _, full = _zero_on_alike_ranks(stage=1, overlap=False)
    alone = [unit for unit in zero.units if len(unit.parameters) == 1 and unit.parameters[0].size % zero.count == 0]
    assert [unit.parameters[0].size for unit in alone] == [16 * 15]  # the tied embedding, which 4 divides
    padded = [p.size for unit in zero.units for p in unit.parameters if p.size % zero.count]
    assert padded, "the model must have parameters that N does not divide"
    for unit in zero.units:
        for p in unit.parameters:
            p.grad = full[id(p)].copy()
        gradients = [p.grad for p in unit.parameters]
        tracemalloc.start()
        try:
            rows = zero._gradient_rows(unit)
            allocated = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        expected = xp.concatenate([zero._rows(p, full[id(p)]) for p in unit.parameters], axis=1)
        assert rows.shape == expected.shape and (rows == expected).all()
        assert all(p.grad is None for p in unit.parameters)  # the full gradients are freed
        if unit in alone:
            assert xp.shares_memory(rows, gradients[0]) and allocated < 1024, allocated
        else:
            assert rows.nbytes <= allocated < rows.nbytes + 1024, (allocated, rows.nbytes)


@pytest.mark.parametrize("stage, overlap", [(1, False), (1, True), (2, False), (2, True)])
def test_gradient_parts_are_views_of_the_reduce_scatter_output(stage, overlap):
    """No copy out: after finish_gradient_sync each part's .grad is its slice of its unit's receive
    buffer, averaged there, and holds this rank's part of the gradient."""
    zero, comm, chunk, batch, full = _zero_on_alike_ranks(stage, overlap)
    zero.start_step()
    chunk(*batch).backward()
    zero.finish_gradient_sync()
    assert len(comm.received) == len(zero.units)  # one reduce-scatter per unit
    for unit in zero.units:
        [received] = [out for out in comm.received if out is unit.gradient]
        for p, place in unit.slots():
            part = zero.updated_tensor(p).grad
            assert part.base is received and xp.shares_memory(part, received[place]), p.shard.full_name
            assert (part == zero._rows(p, full[id(p)])[comm.rank]).all(), p.shard.full_name
