"""Keeping data-parallel replicas identical, and finding out when they are not.

``ReplicaChecks`` is mixed into ``DataParallel`` (data_parallel.py), whose ``parameters``,
``names``, ``comm``, ``buckets`` and ``check_interval`` it reads:

- at start, ``_check_same_parameters_everywhere`` compares every replica's parameter names,
  shapes and dtypes (small metadata, pickled once), since mismatched shapes would make the
  bucket allreduces hang;
- ``broadcast_parameters`` copies dp rank 0's parameters to every rank, one broadcast per bucket;
- ``check_replicas`` compares a $(Σ_i x_i, Σ_i x_i²)$ checksum of every parameter $x$ across the ranks and
  raises ``ReplicaDivergenceError`` on every rank, naming the ranks and parameters that differ.
"""
from minipar.backend import to_host, xp
from minipar.errors import ConfigError


class ReplicaDivergenceError(RuntimeError):
    """Data-parallel replicas that should be identical are not (raised on every rank)."""


class ReplicaChecks:
    """The replica half of ``DataParallel``: same parameters at start, rank 0's copy, checksums."""

    def _check_same_parameters_everywhere(self):
        """Mismatched shapes would make the bucket allreduces hang; say which ranks differ."""
        layout = [(name, tuple(p.shape), p.dtype.str) for name, p in zip(self.names, self.parameters, strict=True)]
        everyone = self.comm.mpi.allgather(layout)  # small metadata, pickled once at start
        differing = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
        if differing:
            theirs, ours = everyone[differing[0]], everyone[0]
            example = next((f"{a} where rank 0 has {b}" for a, b in zip(theirs, ours, strict=False) if a != b),
                           f"{len(theirs)} tensors where rank 0 has {len(ours)}")
            raise ConfigError(f"data-parallel ranks {differing} hold other parameters than dp rank 0 "
                              f"(rank {differing[0]} has {example}); every replica must build the same model")

    def broadcast_parameters(self):
        """Copy dp rank 0's parameters to every rank, one broadcast per bucket."""
        for bucket in self.buckets:
            if self.comm.rank == 0:
                for slot in bucket.slots:
                    bucket.flat[slot.start:slot.stop] = slot.parameter.data.reshape(-1)
            self.comm.broadcast(bucket.flat, root=0)
            for slot in bucket.slots:
                slot.parameter.data[...] = bucket.flat[slot.start:slot.stop].reshape(slot.parameter.shape)

    def check_replicas(self, step=None):
        """Compare a checksum of every parameter across ranks; raise ReplicaDivergenceError if any differ.

        The checksum of a parameter is $(Σ x, Σ x²)$ in float64; the rows of all ranks are
        allgathered (2 floats per tensor) and must agree bitwise. Given ``step``, checks only
        when step % check_interval == 0 and returns None otherwise; returns the local checksums.
        """
        if step is not None and (self.check_interval <= 0 or step % self.check_interval):
            return None
        local = xp.empty((1, 2 * len(self.parameters)), dtype=xp.float64)
        for i, p in enumerate(self.parameters):
            values = p.data.astype(xp.float64)
            local[0, 2 * i], local[0, 2 * i + 1] = values.sum(), (values * values).sum()
        everyone = xp.empty((self.comm.size, local.shape[1]), dtype=xp.float64)
        everyone = to_host(self.comm.allgather(local, everyone))  # a few numbers per rank, compared as bytes
        groups = {}
        for rank in range(self.comm.size):
            groups.setdefault(everyone[rank].tobytes(), []).append(rank)
        if len(groups) > 1:
            raise ReplicaDivergenceError(self._divergence_message(everyone, list(groups.values())))
        return local[0]

    def _divergence_message(self, everyone, groups):
        # The largest group is taken as right (on a tie, the one holding rank 0).
        reference = max(groups, key=lambda ranks: (len(ranks), 0 in ranks))
        diverging = sorted(rank for ranks in groups if ranks is not reference for rank in ranks)
        lines = [f"data-parallel replicas differ: ranks {diverging} disagree with ranks {reference}"]
        for i, name in enumerate(self.names):
            columns = everyone[:, 2 * i:2 * i + 2]
            if (columns != columns[reference[0]]).any():
                values = ", ".join(f"rank {r}: sum {float(columns[r, 0])!r}, sum of squares {float(columns[r, 1])!r}"
                                   for r in sorted({reference[0], *diverging}))
                lines.append(f"  {name}: {values}")
        return "\n".join(lines)
