"""The device mesh (minipar/parallel/mesh.py): coordinates, the rank formula and groups over any axes."""
import pytest

from minipar.errors import ConfigError
from minipar.parallel.mesh import AXES, MeshShape
from minipar.parallel.topology import Layout
from minipar.testing import results_from_ranks
from tests.mpi_bodies.comparisons import assert_as_expected


def test_three_axis_meshes_number_ranks_as_the_hand_written_layout():
    for dp, tp, pp in [(1, 1, 1), (2, 2, 2), (4, 2, 1), (1, 2, 4), (2, 1, 4), (8, 1, 1)]:
        layout, shape = Layout(dp, tp, pp), Layout(dp, tp, pp).mesh_shape
        for rank in range(layout.world_size):
            coordinates = shape.coordinates(rank)
            got = (coordinates["dp"], coordinates["tp"], coordinates["pp"])
            assert got == layout.coordinates(rank), f"dp {dp} tp {tp} pp {pp}, rank {rank}"
            assert shape.rank_of(**coordinates) == rank
            for axis in ("dp", "tp", "pp"):
                assert shape.group_ranks(rank, axis) == layout.group_ranks(rank, axis), (dp, tp, pp, rank, axis)


def test_rank_formula_is_the_mixed_radix_with_tp_fastest():
    shape = MeshShape.of(pp=2, dp=3, ep=2, cp=2, tp=2)
    assert [shape.stride(axis) for axis in AXES] == [24, 8, 4, 2, 1]
    assert shape.coordinates(47) == dict(pp=1, dp=2, ep=1, cp=1, tp=1)
    assert sorted(shape.rank_of(**shape.coordinates(r)) for r in range(48)) == list(range(48))
    assert shape.group_ranks(13, "cp") == [13, 15]  # 13 = dp 1, ep 1, cp 0, tp 1
    assert shape.group_ranks(13, "dp", "cp") == [5, 7, 13, 15, 21, 23]
    assert shape.group_rank(15, "dp", "cp") == 3


def test_axes_of_size_one_change_nothing():
    small, padded = MeshShape.of(dp=2, tp=2), MeshShape.of(dp=2, tp=2, cp=1, ep=1, pp=1)
    assert small == padded
    assert [small.group_ranks(r, "dp", "cp") for r in range(4)] == [small.group_ranks(r, "dp") for r in range(4)]


def test_bad_axes_are_named():
    with pytest.raises(ConfigError, match=r"unknown mesh axes \['sp'\]"):
        MeshShape.of(sp=2)
    with pytest.raises(ConfigError, match="one or more of the axes"):
        MeshShape.of(dp=2).group_ranks(0, "zz")


def test_topology_picture_of_a_five_axis_mesh():
    picture = MeshShape.of(dp=2, cp=2, tp=2).describe()
    assert "rank = tp_rank + cp_rank * 2 + dp_rank * 4" in picture
    assert "stage 0: dp0{ cp0[  0  1 ]   cp1[  2  3 ] }  dp1{ cp0[  4  5 ]   cp1[  6  7 ] }" in picture


@pytest.mark.parametrize("nranks", [1, 2, 4, 8])
def test_mesh_groups_on_ranks(nranks):
    results = results_from_ranks(nranks, "tests.mpi_bodies.mesh_body:mesh_groups_match_the_shape", timeout=240)
    assert_as_expected(results, checks=["mesh groups"])
