"""Checks for the process grid (minipar/parallel/topology.py).

The oracle enumerates the grid in Megatron-LM's order, tensor-parallel fastest, pipeline
slowest (rank = tp_rank + tp·(dp_rank + dp·pp_rank)), by counting, not by formula.
"""
from minipar.course.checking import Check, CheckFailure, require

FORMULA = "rank = tp_rank + tp·(dp_rank + dp·pp_rank), tensor-parallel ranks adjacent"


def _layouts(size):
    return [(dp, tp, size // (dp * tp)) for dp in range(1, size + 1) for tp in range(1, size + 1)
            if size % (dp * tp) == 0]


def _enumerated(dp, tp, pp):
    """world rank -> (dp_rank, tp_rank, pp_rank), by walking the grid in rank order."""
    coordinates = []
    for pp_rank in range(pp):
        for dp_rank in range(dp):
            for tp_rank in range(tp):
                coordinates.append((dp_rank, tp_rank, pp_rank))
    return coordinates


def check_coordinates(comm):
    from minipar.parallel.topology import Layout

    for dp, tp, pp in _layouts(comm.Get_size()):
        expected = _enumerated(dp, tp, pp)
        for rank, coordinates in enumerate(expected):
            got = tuple(Layout(dp, tp, pp).coordinates(rank))
            require(got == coordinates,
                    f"Layout(dp={dp}, tp={tp}, pp={pp}).coordinates({rank}): expected (dp_rank, tp_rank, pp_rank) "
                    f"= {coordinates} ({FORMULA}), got {got}")


def check_groups(comm):
    from minipar.comm import Communicator
    from minipar.parallel.topology import Layout, ProcessGrid

    rank = comm.Get_rank()
    for dp, tp, pp in _layouts(comm.Get_size()):
        grid = ProcessGrid(Layout(dp, tp, pp), Communicator(comm))
        coordinates = _enumerated(dp, tp, pp)
        mine = coordinates[rank]
        for group, axis in (("tp", 1), ("dp", 0), ("pp", 2)):
            sub = getattr(grid, group, None)
            if sub is None:
                raise CheckFailure(f"rank {rank}, layout dp={dp} tp={tp} pp={pp}: grid.{group} was not set")
            members = sub.mpi.allgather(rank)     # small metadata: who is in my group, in group-rank order
            expected = [r for r, other in enumerate(coordinates)
                        if all(other[a] == mine[a] for a in range(3) if a != axis)]
            expected.sort(key=lambda r: coordinates[r][axis])
            require(members == expected,
                    f"rank {rank}, layout dp={dp} tp={tp} pp={pp}: grid.{group} holds world ranks {members} "
                    f"(in {group}-rank order), expected {expected}: the ranks that share every coordinate but "
                    f"{group}_rank, ordered by {group}_rank ({FORMULA})")
            require(sub.rank == mine[axis],
                    f"rank {rank}, layout dp={dp} tp={tp} pp={pp}: grid.{group}.rank is {sub.rank}, "
                    f"expected its {group}_rank {mine[axis]}")
        for group in ("tp", "dp", "pp"):
            getattr(grid, group).mpi.Free()


CHECKS = [
    Check("Layout.coordinates, every layout", (1, 4, 8), check_coordinates),
    Check("ProcessGrid groups, every layout", (1, 2, 4, 8), check_groups),
]
