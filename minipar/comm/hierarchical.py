"""Hierarchical allreduce: reduce inside each node, allreduce across nodes, broadcast back.

Inside a node ranks talk over fast links (NVLink, shared memory); between nodes over a slower
network (InfiniBand). A flat ring of $N = M·K$ ranks ($M$ nodes of $K$ ranks, numbered node by
node) crosses the network on every node's last link at each of its $2(N−1)$ steps. The hierarchical
allreduce (Jia et al. 2018, "Highly scalable deep learning training system with mixed-precision";
Horovod's and ChainerMN's hierarchical communicators) sends far less over the network:

| step         | what happens                                                      | links      |
|--------------|-------------------------------------------------------------------|------------|
| 1. reduce    | the $K$ ranks of a node sum into their leader (local rank 0)      | intra-node |
| 2. allreduce | the $M$ leaders run a ring among themselves                       | inter-node |
| 3. broadcast | each leader copies the result to its $K$ ranks                    | intra-node |

Bytes crossing node boundaries for $n$ bytes of data, all nodes together:

| allreduce    | bytes between nodes               | why                                      |
|--------------|-----------------------------------|------------------------------------------|
| flat ring    | $M · 2(N−1)/N · n$                | one crossing link per node, every step   |
| hierarchical | $M · 2(M−1)/M · n = 2(M−1) · n$   | only the leaders' ring crosses           |

For $N = 8$ as 2 nodes of 4: $3.5 n$ against $2 n$. With α–β costs ($α$ latency, $β$ seconds per
byte, subscript for the link; binomial trees inside the node; in the flat ring the slowest link
sets the pace):

| allreduce    | time                                                                                  |
|--------------|---------------------------------------------------------------------------------------|
| flat ring    | $T_{flat} ≈ 2(N−1) α_{inter} + 2((N−1)/N) n β_{inter}$                                |
| hierarchical | $T_{hier} ≈ 2⌈lg K⌉ (α_{intra} + n β_{intra}) + 2(M−1) α_{inter} + 2((M−1)/M) n β_{inter}$ |

The sum is the same as the flat allreduce's, formed in another order: equal in exact arithmetic,
and in floating point equal up to rounding (bitwise equal for integer-valued data).

Nodes come from MPI itself (``shared_memory_node``: ranks that share memory) or, to teach it on
one machine, from ``node_of_world_rank(K)``: world ranks $0 … K−1$ are node 0, $K … 2K−1$ node 1, and
so on (``--ranks-per-node K``). Any group can be split this way, a data-parallel group of a 3D grid too.
"""
from mpi4py import MPI

from minipar.errors import ConfigError


class NodeGroups:
    """This rank's node communicator (``intra``) and the node leaders' one (``leaders``).

    ``node`` is this rank's node number: ``node_of_world_rank`` (simulated nodes of K consecutive
    world ranks) or ``shared_memory_node`` (the real machine). Ranks of ``comm`` with the same node
    form one ``intra`` group, led by its lowest rank.
    """

    def __init__(self, comm, node):
        self.comm, self.node = comm, node
        self.intra = comm.split(color=node, key=comm.rank)
        self.is_leader = self.intra.rank == 0
        # Every rank must join the Split; non-leaders get a group they never use.
        self.leaders = comm.split(color=0 if self.is_leader else 1, key=comm.rank)
        self.nodes = self.leaders.size if self.is_leader else None

    def allreduce(self, array):
        """Sum ``array`` over all ranks in place, node by node (see the module docstring)."""
        if self.is_leader:
            reduced = array.copy()
            self.intra.reduce(array, reduced, root=0)
            self.leaders.allreduce(reduced, algorithm="ring")
            array[...] = reduced
        else:
            self.intra.reduce(array, None, root=0)
        self.intra.broadcast(array, root=0)
        return array

    def inter_node_bytes_sent(self):
        """Bytes this rank sent to other nodes so far: everything on the leaders' ring."""
        if not self.is_leader:
            return 0
        return sum(record.bytes_sent for record in self.leaders.counters.values())


def node_of_world_rank(ranks_per_node):
    """Simulated nodes for teaching on one machine: world ranks $0 … K−1$ are node 0, $K … 2K−1$ node 1, …"""
    world = MPI.COMM_WORLD
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
        raise ConfigError(f"ranks_per_node must be a positive integer, got {ranks_per_node!r}")
    if world.Get_size() % ranks_per_node:
        raise ConfigError(f"{world.Get_size()} ranks cannot form nodes of {ranks_per_node}: "
                          f"--ranks-per-node must divide the number of ranks")
    return world.Get_rank() // ranks_per_node


def shared_memory_node(comm):
    """The real machine: ranks that can share memory are one node; numbered by their lowest rank."""
    local = comm.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    lowest = local.allreduce(comm.rank, op=MPI.MIN)  # small metadata: one integer
    local.Free()
    return lowest


def flat_ring_inter_node_bytes_sent(groups, bytes_sent):
    """Of the ``bytes_sent`` this rank put on a flat ring over ``groups.comm``, those that left its node.

    In a ring every message goes to the right neighbour, rank + 1 (mod N), so a rank's bytes
    cross a node boundary exactly when that neighbour sits on another node. Collective (every
    rank learns every rank's node: a few integers).
    """
    nodes = groups.comm.mpi.allgather(groups.node)
    right = (groups.comm.rank + 1) % groups.comm.size
    return bytes_sent if nodes[right] != groups.node else 0


def allreduce_costs(n_bytes, ranks_per_node, nodes, alpha_intra, beta_intra, alpha_inter, beta_inter):
    """α–β seconds of the flat ring and of the hierarchical allreduce (module docstring)."""
    size = ranks_per_node * nodes
    depth = (ranks_per_node - 1).bit_length()  # ⌈lg K⌉ levels of the binomial trees
    flat = 2 * (size - 1) * alpha_inter + 2 * (size - 1) / size * n_bytes * beta_inter
    hierarchical = (2 * depth * (alpha_intra + n_bytes * beta_intra)
                    + 2 * (nodes - 1) * alpha_inter + 2 * (nodes - 1) / nodes * n_bytes * beta_inter)
    return {"flat_ring": flat, "hierarchical": hierarchical}
