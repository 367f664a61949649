"""The peer that bench_mlp.py measures minipar against: the same MLP in plain NumPy + mpi4py.

Every backward pass is written by hand, gradients live in one flat buffer (so data parallelism
is one in-place Allreduce and the 1/N of the average folds into the learning rate), and pipeline
stages exchange activations with Isend / Recv between preallocated buffers. It does the same
maths as minipar's run: Linear layers y = x W + b, ReLU between them, mean softmax cross-entropy
on the last layer, the batch in m micro-batches whose losses are scaled by 1/m, and plain SGD.
No autograd, no checks: the floor a framework's fixed costs are measured against.
"""
import numpy as np


class PeerMLP:
    """Layers [first, last) of an MLP with the given widths; weights (in, out) as in minipar."""

    def __init__(self, widths, weights, biases, first=0, last=None):
        last = len(widths) - 1 if last is None else last
        self.first, self.last, self.total = first, last, len(widths) - 1
        sizes = [w.size + b.size for w, b in zip(weights[first:last], biases[first:last], strict=True)]
        dtype = weights[0].dtype
        self.flat_params, self.flat_grads = np.empty(sum(sizes), dtype), np.zeros(sum(sizes), dtype)
        self.W, self.b, self.gW, self.gb = [], [], [], []
        start = 0
        for w, b in zip(weights[first:last], biases[first:last], strict=True):  # views into the flat buffers
            for source, params, grads in ((w, self.W, self.gW), (b, self.b, self.gb)):
                params.append(self.flat_params[start:start + source.size].reshape(source.shape))
                grads.append(self.flat_grads[start:start + source.size].reshape(source.shape))
                params[-1][...] = source
                start += source.size

    @property
    def has_head(self):
        return self.last == self.total

    def forward(self, x, targets=None, scale=1.0):
        """Returns (output or loss, what backward needs). The head's loss is scaled by ``scale``."""
        inputs, masks = [], []
        for i, (w, b) in enumerate(zip(self.W, self.b, strict=True)):
            inputs.append(x)
            x = x @ w
            x += b
            if self.first + i < self.total - 1:  # ReLU after every layer but the head
                masks.append(x > 0)
                x *= masks[-1]
        if not self.has_head:
            return x, (inputs, masks)
        shifted = x - x.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        rows = np.arange(len(targets))
        loss = -np.log(probabilities[rows, targets]).mean()
        grad = probabilities
        grad[rows, targets] -= 1
        grad *= scale / len(targets)
        return loss, (inputs, masks, grad)

    def backward(self, saved, grad=None):
        """Adds this micro-batch's gradients into flat_grads; returns dL/d(input) (None on the first stage)."""
        inputs, masks = saved[0], saved[1]
        if grad is None:
            grad = saved[2]
        for i in range(len(self.W) - 1, -1, -1):
            if i < len(masks):
                grad = grad * masks[i]
            self.gW[i] += inputs[i].T @ grad
            self.gb[i] += grad.sum(axis=0)
            if i or self.first:
                grad = grad @ self.W[i].T
        return grad if self.first else None

    def sgd_step(self, lr):
        self.flat_params -= lr * self.flat_grads
        self.flat_grads[...] = 0


def sequential_step(model, micro_inputs, micro_targets, lr, comm=None):
    """One step: m micro-batches, gradient accumulation, an Allreduce over ``comm`` if given, SGD."""
    m = len(micro_inputs)
    for x, t in zip(micro_inputs, micro_targets, strict=True):
        _, saved = model.forward(x, t, scale=1.0 / m)
        model.backward(saved)
    if comm is not None and comm.size > 1:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, model.flat_grads, op=MPI.SUM)
        lr = lr / comm.size  # the average's 1/N, folded into the update
    model.sgd_step(lr)


class PeerPipeline:
    """GPipe or 1F1B over the ranks of ``comm``, one stage each, with hand-written messaging."""

    def __init__(self, model, comm, schedule, num_microbatches, boundary_shapes, dtype):
        self.model, self.comm, self.schedule, self.m = model, comm, schedule, num_microbatches
        self.stage, self.stages = comm.rank, comm.size
        before = boundary_shapes[self.stage - 1] if self.stage else None
        after = boundary_shapes[self.stage] if self.stage < self.stages - 1 else None
        self.activation_in = np.empty(before, dtype) if before else None
        self.gradient_in = np.empty(after, dtype) if after else None
        self.send_buffers = []

    def _send(self, array, destination, tag):
        buffer = np.ascontiguousarray(array).copy()  # kept alive until the send completes
        self.send_buffers.append((buffer, self.comm.Isend(buffer, destination, tag)))

    def _forward(self, i, micro_inputs, micro_targets, saved, losses):
        if self.stage == 0:
            x = micro_inputs[i]
        else:
            self.comm.Recv(self.activation_in, self.stage - 1, tag=i)
            x = self.activation_in.copy()
        if self.stage == self.stages - 1:
            loss, saved[i] = self.model.forward(x, micro_targets[i], scale=1.0 / self.m)
            losses.append(loss)
        else:
            y, saved[i] = self.model.forward(x)
            self._send(y, self.stage + 1, i)

    def _backward(self, i, saved):
        grad = None
        if self.stage < self.stages - 1:
            self.comm.Recv(self.gradient_in, self.stage + 1, tag=self.m + i)
            grad = self.gradient_in
        grad_in = self.model.backward(saved.pop(i), grad)
        if self.stage:
            self._send(grad_in, self.stage - 1, self.m + i)

    def step(self, micro_inputs, micro_targets, lr):
        saved, losses = {}, []
        if self.schedule == "gpipe":
            order = [("f", i) for i in range(self.m)] + [("b", i) for i in range(self.m)]
        else:  # 1F1B: p - s - 1 warm-up forwards, then one forward one backward, then the rest
            warmup = min(self.stages - self.stage - 1, self.m)
            order = [("f", i) for i in range(warmup)]
            for i in range(self.m - warmup):
                order += [("f", warmup + i), ("b", i)]
            order += [("b", i) for i in range(self.m - warmup, self.m)]
        for kind, i in order:
            if kind == "f":
                self._forward(i, micro_inputs, micro_targets, saved, losses)
            else:
                self._backward(i, saved)
        for _, request in self.send_buffers:
            request.Wait()
        self.send_buffers.clear()
        self.model.sgd_step(lr)
        return sum(losses) if losses else None
