"""Rank bodies for tests/test_precision.py: each returns values for pytest to compare."""
import numpy as np

from minipar.comm.communicator import Communicator
from minipar.precision import DynamicLossScaler


def agreed_skips(mpi_comm, overflow_on, steps=4, growth_interval=2):
    """Rank ``overflow_on[step]`` (or none, -1) plants an inf at each step; every rank reports its
    decisions. All ranks must skip together and hold the same scale."""
    comm = Communicator(mpi_comm)
    scaler = DynamicLossScaler(comm, growth_interval=growth_interval)
    decisions = []
    for step in range(steps):
        gradient = np.full(5, float(scaler.scale) * (comm.rank + 1), dtype=np.float32)
        if overflow_on[step] == comm.rank:
            gradient[2] = np.inf
        stepped = scaler.unscale_and_check([gradient])
        scaler.update()
        decisions.append([bool(stepped), float(scaler.scale)])
    return {"decisions": decisions, "allreduces": comm.counters["allreduce"].calls}
