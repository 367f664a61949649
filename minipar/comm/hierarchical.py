"""Hierarchical allreduce: reduce inside each node, allreduce across nodes, broadcast back.

Inside a node ranks talk over fast links (NVLink, shared memory); between nodes over a slower
network (InfiniBand). A flat ring of N = M·K ranks (M nodes of K ranks, numbered node by node)
crosses the network on every node's last link at each of its 2(N−1) steps. The hierarchical
allreduce (Jia et al. 2018, "Highly scalable deep learning training system with mixed-precision";
Horovod's and ChainerMN's hierarchical communicators) sends far less over the network:

    1. reduce     the K ranks of a node sum into their leader (local rank 0)   intra-node
    2. allreduce  the M leaders run a ring among themselves                     inter-node
    3. broadcast  each leader copies the result to its K ranks                  intra-node

Bytes crossing node boundaries for n bytes of data, all nodes together:

    flat ring      M · 2(N−1)/N · n     (one crossing link per node, every step)
    hierarchical   M · 2(M−1)/M · n  =  2(M−1) · n

For N = 8 as 2 nodes of 4: 3.5 n against 2 n. With α–β costs (α latency, β seconds per byte,
subscript for the link; binomial trees inside the node):

    T_flat ≈ 2(N−1) α_inter + 2((N−1)/N) n β_inter          (the slowest link sets the pace)
    T_hier ≈ 2⌈lg K⌉ (α_intra + n β_intra) + 2(M−1) α_inter + 2((M−1)/M) n β_inter

The sum is the same as the flat allreduce's, formed in another order: equal in exact arithmetic,
and in floating point equal up to rounding (bitwise equal for integer-valued data).

Nodes come from MPI itself (``MPI.COMM_TYPE_SHARED``: ranks that share memory) or, to teach it on
one machine, from ``ranks_per_node=K``: ranks 0..K−1 are node 0, K..2K−1 node 1, and so on.
"""
from mpi4py import MPI

from minipar.comm.communicator import Communicator
from minipar.errors import ConfigError


class NodeGroups:
    """This rank's node communicator (``intra``) and, on leaders, the leaders' one (``leaders``)."""

    def __init__(self, comm, ranks_per_node=None):
        if ranks_per_node is None:  # the real machine: ranks that can share memory
            self.intra = Communicator(comm.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank))
            ranks_per_node = self.intra.size
        else:
            if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
                raise ConfigError(f"ranks_per_node must be a positive integer, got {ranks_per_node!r}")
            if comm.size % ranks_per_node:
                raise ConfigError(f"{comm.size} ranks cannot form nodes of {ranks_per_node}: "
                                  f"ranks_per_node must divide the group size")
            self.intra = comm.split(color=comm.rank // ranks_per_node, key=comm.rank)
        self.ranks_per_node = ranks_per_node
        self.is_leader = self.intra.rank == 0
        # Every rank must join the Split; non-leaders get a group they never use.
        self.leaders = comm.split(color=0 if self.is_leader else 1, key=comm.rank)

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


def flat_ring_inter_node_bytes_sent(rank, size, ranks_per_node, bytes_sent):
    """Of the ``bytes_sent`` a rank put on a flat ring, those that crossed to another node.

    In a ring every message goes to the right neighbour, rank + 1 (mod N), so a rank's bytes
    cross a node boundary exactly when that neighbour sits on another node.
    """
    right = (rank + 1) % size
    return bytes_sent if right // ranks_per_node != rank // ranks_per_node else 0


def allreduce_costs(n_bytes, ranks_per_node, nodes, alpha_intra, beta_intra, alpha_inter, beta_inter):
    """α–β seconds of the flat ring and of the hierarchical allreduce (module docstring)."""
    size = ranks_per_node * nodes
    depth = (ranks_per_node - 1).bit_length()  # ⌈lg K⌉ levels of the binomial trees
    flat = 2 * (size - 1) * alpha_inter + 2 * (size - 1) / size * n_bytes * beta_inter
    hierarchical = (2 * depth * (alpha_intra + n_bytes * beta_intra)
                    + 2 * (nodes - 1) * alpha_inter + 2 * (nodes - 1) / nodes * n_bytes * beta_inter)
    return {"flat_ring": flat, "hierarchical": hierarchical}
