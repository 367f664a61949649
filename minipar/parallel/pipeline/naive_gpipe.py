"""A blocking GPipe step: every forward, then every backward. Read this before executor.py.

GPipe (Huang et al. 2019) cuts the model into $p$ stages, one per rank, and the batch into $m$
micro-batches. Stage $s$ runs micro-batch $i$ as soon as stage $s−1$ has sent it; after the last
forward the backwards run in reverse, each stage sending $∂L/∂x$ back to the one before:

    forward:   receive x from s-1 (stage 0: the ids) -> y = chunk(x) -> send y to s+1
    backward:  receive dL/dy from s+1 (last stage: from its loss) -> backward -> send dL/dx to s-1

The loss of micro-batch $i$ is scaled by $1/m$, so the gradients that add up over the $m$ backwards
are those of the whole batch's mean loss. Every stage keeps all $m$ micro-batches' activations until
their backward (GPipe's memory), and for a fraction $(p−1)/(m+p−1)$ of the step it waits (the
bubble). Sends and receives block: a send into a stage still busy waits for it, which is safe
because in each phase messages flow one way only. executor.py runs the same step and others
(1F1B, interleaved) from a schedule, with non-blocking messages into preallocated buffers.
"""
from minipar.backend import xp
from minipar.tensor import Tensor


def run_gpipe(chunk, pp_comm, micro_inputs, micro_targets, activation_shape, dtype):
    """One step of ``chunk`` (this rank's PipelineChunk) over the m micro-batches; gradients accumulate
    into its parameters. Returns the mean loss on the last stage, None elsewhere."""
    stage, last = pp_comm.rank, pp_comm.size - 1
    m = len(micro_inputs)
    stash, losses = [], []
    for i in range(m):  # every forward
        if stage == 0:
            x = micro_inputs[i]  # token ids: no gradient to send back
        else:
            x = Tensor(pp_comm.recv(xp.empty(activation_shape, dtype=dtype), source=stage - 1, tag=i),
                       requires_grad=True)
        if stage == last:
            loss = chunk(x, micro_targets[i])
            losses.append(float(loss.item()))
            y = loss * (1.0 / m)
        else:
            y = chunk(x)
            pp_comm.send(xp.ascontiguousarray(y.data), dest=stage + 1, tag=i)
        stash.append((x, y))
    for i in reversed(range(m)):  # every backward, the last micro-batch first
        x, y = stash.pop()
        if stage == last:
            y.backward()
        else:
            y.backward(pp_comm.recv(xp.empty(activation_shape, dtype=dtype), source=stage + 1, tag=i))
        if stage > 0:
            pp_comm.send(xp.ascontiguousarray(x.grad), dest=stage - 1, tag=i)
    return sum(losses) / m if stage == last else None
