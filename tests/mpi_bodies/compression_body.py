"""Rank bodies for tests/test_communication_reduction.py: each returns values for pytest to compare."""
import numpy as np

from minipar.comm.collectives import block_bounds, modelled_traffic
from minipar.comm.communicator import Communicator
from minipar.comm.compression import HalfPrecision, PowerSGD, TopK
from minipar.comm.hierarchical import NodeGroups, flat_ring_inter_node_bytes_sent, node_of_world_rank


def _rank_gradients(rank, shapes, seed=0):
    rng = np.random.default_rng((seed, rank))
    return [rng.standard_normal(shape) for shape in shapes]


def _everyones(comm, arrays):
    """Every rank's list of arrays, by rank (small test data: pickled metadata-sized lists)."""
    return comm.mpi.allgather([a.copy() for a in arrays])


def sixteen_bit_ring(mpi_comm, codec, size=1003):
    """The 16-bit ring's result on this rank, its bytes, and the one-process replay's result."""
    from tests.test_compression import replay_16bit_ring

    comm = Communicator(mpi_comm)
    gradient = _rank_gradients(comm.rank, [(size,)])[0]
    everyone = [g[0] for g in _everyones(comm, [gradient])]
    averaged = [gradient.copy()]
    HalfPrecision(codec).average(averaged, comm)
    record = comm.counters["allreduce"]
    expected_bytes = modelled_traffic("allreduce", comm.rank, comm.size, size, 2).bytes_sent
    return {"max_difference_from_replay": float(np.abs(averaged[0] - replay_16bit_ring(everyone, codec) / comm.size).max()),
            "bitwise_equal_to_replay": bool(np.array_equal(averaged[0], replay_16bit_ring(everyone, codec) / comm.size)),
            "bytes_sent": record.bytes_sent, "expected_bytes_sent": int(expected_bytes),
            "max_error_vs_exact_mean": float(np.abs(averaged[0] - np.mean(everyone, axis=0)).max())}


def topk_identities(mpi_comm, ratio=0.05, steps=3):
    """Per step: sent + new residual == corrected (bitwise); the mean of what all ranks sent."""
    comm = Communicator(mpi_comm)
    topk = TopK(ratio)
    shapes = [(16, 12), (12,)]
    report = {"identity_exact": True, "mean_exact": True}
    for step in range(steps):
        gradients = _rank_gradients(comm.rank, shapes, seed=step)
        corrected = [g + topk.residuals.get(i, 0) for i, g in enumerate(gradients)]
        comm.reset_counters()
        topk.average(gradients, comm)
        sent = [topk.last_sent[i] for i in range(len(shapes))]
        for i in range(len(shapes)):
            report["identity_exact"] &= bool(np.array_equal(sent[i] + topk.residuals[i], corrected[i]))
        all_sent = _everyones(comm, sent)
        for i in range(len(shapes)):
            expected = np.zeros(shapes[i])
            for rank_sent in all_sent:  # rank order, as the all-gather delivers them
                expected += rank_sent[i]
            report["mean_exact"] &= bool(np.array_equal(gradients[i], expected / comm.size))
    k = [int(np.ceil(ratio * np.prod(s))) for s in shapes]
    report["allgather_elements"] = comm.counters["allgather"].elements
    report["expected_allgather_elements"] = 2 * comm.size * sum(k)  # indices and values, every rank's k
    report["bytes_sent"] = comm.counters["allgather"].bytes_sent
    report["expected_bytes_sent"] = (comm.size - 1) * sum(k) * (8 + 8)  # int64 index + float64 value
    return report


def powersgd_identities(mpi_comm, rank=2, steps=3):
    """P orthonormal, approximation + residual == corrected, Q the mean of Mᵀ P, bytes = (n+m)r."""
    comm = Communicator(mpi_comm)
    compressor = PowerSGD(rank, seed=7)
    shapes = [(16, 12), (12,), (10, 3, 4)]
    worst = {"orthonormality": 0.0, "identity": 0.0, "q_mean": 0.0}
    for step in range(steps):
        gradients = _rank_gradients(comm.rank, shapes, seed=step)
        corrected = {i: gradients[i].reshape(shapes[i][0], -1) + compressor.residuals.get(i, 0)
                     for i in (0, 2)}
        comm.reset_counters()
        compressor.average(gradients, comm)
        everyone = comm.mpi.allgather({i: corrected[i].copy() for i in (0, 2)})
        for i in (0, 2):
            p, q = compressor.last_sent[i]
            worst["orthonormality"] = max(worst["orthonormality"], float(np.abs(p.T @ p - np.eye(rank)).max()))
            identity = gradients[i].reshape(corrected[i].shape) + compressor.residuals[i] - corrected[i]
            worst["identity"] = max(worst["identity"], float(np.abs(identity).max() / np.abs(corrected[i]).max()))
            mean_q = sum(m[i].T @ p for m in everyone) / comm.size
            worst["q_mean"] = max(worst["q_mean"], float(np.abs(q - mean_q).max() / np.abs(mean_q).max()))
    elements = comm.counters["allreduce"].elements
    expected = (16 + 12) * rank + 12 + (10 + 12) * rank  # P and Q of both matrices, the vector whole
    return {**worst, "allreduce_elements": elements, "expected_allreduce_elements": expected,
            "allreduce_calls": comm.counters["allreduce"].calls}


def hierarchical_versus_flat(mpi_comm, ranks_per_node, size=1000):
    """Bitwise equality with the flat ring on integer-valued data; bytes crossing nodes."""
    comm = Communicator(mpi_comm)
    data = np.random.default_rng(comm.rank).integers(-1000, 1000, size).astype(np.float64)
    flat = data.copy()
    comm.allreduce(flat, algorithm="ring")
    flat_sent = comm.counters["allreduce"].bytes_sent
    groups = NodeGroups(comm, node_of_world_rank(ranks_per_node))
    hierarchical = data.copy()
    groups.allreduce(hierarchical)
    real = np.random.default_rng(comm.rank + 100).standard_normal(size)
    flat_real, hierarchical_real = real.copy(), real.copy()
    comm.allreduce(flat_real, algorithm="ring")
    groups.allreduce(hierarchical_real)
    return {"bitwise_equal_integer_data": bool(np.array_equal(flat, hierarchical)),
            "relative_difference_real_data": float(np.abs(flat_real - hierarchical_real).max()
                                                   / np.abs(flat_real).max()),
            "hierarchical_inter_node_bytes": groups.inter_node_bytes_sent() // 2,  # two allreduces ran
            "flat_inter_node_bytes": flat_ring_inter_node_bytes_sent(groups, flat_sent),
            "is_leader": groups.is_leader}


def block_sizes(size, nranks):
    return [stop - start for start, stop in block_bounds(size, nranks)]
