"""Placements (minipar/parallel/placement.py): what the Trainer records for every parameter of the GPT
on every axis, as docs/mesh.md tabulates it, and the axes the gradient norm sums over."""
import pytest

from minipar.parallel.placement import Partial, Replicate, Shard, counts_in_model_sum, norm_axes, place
from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected


class FakeMesh:
    def __init__(self, sizes, coordinates):
        self.sizes, self.coordinates = sizes, coordinates

    def size(self, axis):
        return self.sizes.get(axis, 1)

    def coordinate(self, axis):
        return self.coordinates.get(axis, 0)


class Tensor:
    pass


def test_counting_follows_the_placements():
    weight = place(Tensor(), tp=Shard(1), pp=Shard(None), dp=Partial("avg"))
    norm = place(Tensor(), tp=Partial("sum"), pp=Shard(None), dp=Partial("avg"))
    tied = place(Tensor(), tp=Shard(0), pp=Partial("sum", holders=(0, 3)), dp=Partial("avg"))
    plain = Tensor()
    mesh = FakeMesh(dict(dp=2, tp=2, pp=4), dict(dp=1, tp=1, pp=3))
    axes = norm_axes([weight, norm, tied, plain], mesh)
    assert axes == ["pp", "tp"]  # dp: every replica holds the same, so each counts the whole norm
    assert [counts_in_model_sum(t, mesh, axes) for t in (weight, norm, tied, plain)] == [True, False, False, False]
    first = FakeMesh(mesh.sizes, dict(dp=1, tp=0, pp=0))
    assert [counts_in_model_sum(t, first, axes) for t in (weight, norm, tied, plain)] == [True, True, True, True]
    assert isinstance(Tensor().__dict__.get("placements", {}).get("cp", Replicate()), Replicate)


@pytest.mark.parametrize("nranks, layout", [
    (8, dict(dp=2, tp=2, pp=2, microbatches=2, sequence_parallel=True)),
    (4, dict(dp=2, pp=2, microbatches=2, zero=1)),
    (2, dict(tp=2)),
])
def test_trainer_placements_are_the_table(nranks, layout):
    results = results_from_ranks(nranks, "tests.mpi_bodies.placement_body:trainer_placements", timeout=180,
                                 layout=layout)
    assert_as_expected(results, checks=["placements"])
