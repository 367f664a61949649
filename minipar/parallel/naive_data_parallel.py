"""Naive data parallelism: one allreduce per parameter after backward. Read this before data_parallel.py.

N replicas hold the same weights; each runs forward and backward on its own B/N rows of the
batch, so its gradient $g_i$ is the gradient of the mean loss over those rows. The loss of the
whole batch is the mean of the N replicas' losses, so its gradient is the mean of theirs, one
allreduce, then a division, per parameter:

$$g = (1/N) Σ_i g_i$$

and with the same $g$ every replica takes the same optimizer step: the replicas stay identical,
and training is one process's on the whole batch (Li et al. 2020, "PyTorch Distributed", section 3).

What this leaves slow, and what parallel/data_parallel.py does about it: one collective per
parameter pays its latency as many times as the model has tensors (there: buckets of many), and
nothing is sent until backward has ended (there: a bucket is sent as soon as its gradients are
final, during the rest of backward).
"""
from minipar.backend import xp


class NaiveDataParallel:
    """``finish_gradient_sync()`` after backward leaves every parameter's .grad the replicas' mean."""

    def __init__(self, parameters, communicator):
        self.parameters = list({id(p): p for p in parameters}.values())  # a tied weight once
        self.communicator = communicator
        for p in self.parameters:  # every replica starts from rank 0's weights
            communicator.broadcast(p.data, root=0)

    def finish_gradient_sync(self):
        for p in self.parameters:
            grad = xp.zeros_like(p.data) if p.grad is None else xp.ascontiguousarray(p.grad)  # unused: zero
            self.communicator.allreduce(grad)  # Σ_i g_i, in place, on every rank
            p.grad = grad / self.communicator.size
