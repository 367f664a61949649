"""Checks for minipar.parallel.mesh, run on every rank by tests/test_mesh.py."""
from minipar.comm import Communicator
from minipar.parallel.mesh import AXES, DeviceMesh, MeshShape
from minipar.parallel.topology import Layout, ProcessGrid
from tests.mpi_bodies.reporting import report


def shapes(size):
    """Every (pp, dp, cp, tp) whose product is ``size`` (ep left at 1 to keep the run short)."""
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    return [dict(pp=pp, dp=dp, cp=cp, tp=size // (pp * dp * cp)) for pp in divisors for dp in divisors
            for cp in divisors if size % (pp * dp * cp) == 0]


def members(group):
    return group.mpi.allgather(Communicator().rank)  # small metadata: world ranks in group-rank order


def mesh_groups_match_the_shape(comm):
    """Every group of every mesh holds the ranks ``MeshShape.group_ranks`` names, in that order; the
    three-axis meshes give the hand-written ProcessGrid's groups and coordinates."""
    world = Communicator(comm)
    checks = []
    for sizes in shapes(world.size):
        shape = MeshShape.of(**sizes)
        mesh = DeviceMesh(shape, world)
        label = " x ".join(f"{a} {s}" for a, s in sizes.items())
        for axes in [(axis,) for axis in AXES] + [("dp", "cp"), ("cp", "tp"), ("pp", "dp", "tp")]:
            group = mesh.group(*axes)
            checks.append((f"{label}: rank {world.rank}'s group over {axes}", members(group), "==",
                           shape.group_ranks(world.rank, *axes)))
            checks.append((f"{label}: rank {world.rank}'s place in its group over {axes}", group.rank, "==",
                           shape.group_rank(world.rank, *axes)))
        if sizes["cp"] == 1:  # a size-1 axis costs nothing: the same group, no new split
            same = mesh.group("dp", "cp") is mesh.group("dp") if sizes["dp"] > 1 else mesh.group("dp", "cp").size == 1
            checks.append((f"{label}: group over dp and cp (cp = 1) is the dp group (or this rank alone)",
                           same, "==", True))
            grid = ProcessGrid(Layout(sizes["dp"], sizes["tp"], sizes["pp"]), world)
            for axis in ("dp", "tp", "pp"):
                checks.append((f"{label}: rank {world.rank}, mesh and ProcessGrid {axis} groups",
                               members(mesh.group(axis)), "==", members(getattr(grid, axis))))
                checks.append((f"{label}: rank {world.rank}, {axis} coordinate", mesh.coordinate(axis), "==",
                               getattr(grid, f"{axis}_rank")))
    return report(["mesh groups"], checks)
