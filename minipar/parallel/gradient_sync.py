"""How local gradients become the single-process gradient: one interface for every data-parallel mode.

After backward each of N data-parallel replicas holds the gradient of its own rows only; the
optimizer needs their average $Δθ = (1/N) Σ_i Δθ_i$. Three ways to get it, one interface:

    SingleReplica   N = 1: nothing to send (this module)
    DataParallel    every rank keeps everything and allreduces (parallel/data_parallel.py)
    Zero            every rank keeps 1/N of it and reduce-scatters (parallel/zero.py)

The Trainer calls, once per step, in this order:

    sync.start_step()                forget the last step's gradients
    <forward and backward>           grad-ready hooks (sync.gradient_ready) may start sending
    sync.finish_gradient_sync()      each tensor of sync.updated has its averaged .grad
    <model-parallel sums and clipping on sync.updated; optimizer.step() on sync.updated>
    sync.after_optimizer_step(step)  ZeRO 1-2 all-gather the parameters; DP checks the replicas

``updated`` are the tensors the optimizer updates: the parameters themselves, or under ZeRO
the parts of them this rank owns (``optimizer_groups`` turns groups of parameters into groups
of those). ``partitioned_over`` names the groups across which the updated tensors are disjoint
parts of the whole, so a sum over the model (the squared gradient norm) is summed over them too.
That is the whole of the sync interface (``SYNC_MEMBERS``), and all a step needs.

Its state is a second, separate interface (``STATE_MEMBERS``), an object of its own that the
sync holds as ``sync.state`` (``ReplicaState`` here; ``DataParallelState``, ``CompressedState``,
``LocalSGDState`` and ``ZeroState`` beside their modes). Checkpoints see arrays shaped like each
parameter's tensor-parallel shard in every mode (``parameter_arrays``, ``load_parameter``,
``optimizer_state_arrays``, ``load_optimizer_state``; ``gradient_arrays`` for tests;
``state_arrays`` and ``load_state_arrays`` for what only this rank holds), and ``memory_report``
measures the bytes behind the arrays.

In the vocabulary of parallel/placement.py the data-parallel average is the sum of a gradient
that is Partial("avg") on the dp axis; under ZeRO the updated tensors are Shard(0) on dp
(``partitioned_over`` names the dp group then). The other partial gradients (sequence
parallelism's over tp, the tied embedding's between the first and last stage) are summed the
same way for every axis by ``placement.PartialGradientSum``, after this one; all are linear, so
their order does not change the result.
"""
from minipar.backend import xp

MOMENTS = ("m", "v")  # AdamW's per-parameter state, as checkpoints store it

SYNC_MEMBERS = ("updated", "updated_tensor", "optimizer_groups", "partitioned_over", "piece_runner",
                "start_step", "gradient_ready", "finish_gradient_sync", "after_optimizer_step")
STATE_MEMBERS = ("parameter_arrays", "load_parameter", "gradient_arrays", "optimizer_state_arrays",
                 "load_optimizer_state", "state_arrays", "load_state_arrays", "memory_report")


def bytes_held(arrays):
    """Bytes of memory behind ``arrays``, each buffer once (a view counts its whole base)."""
    owners = {}
    for array in arrays:
        if array is not None:
            owner = array if array.base is None else array.base
            owners[id(owner)] = owner.nbytes
    return sum(owners.values())


def memory_report(parameters, gradients, optimizer):
    """{parameters, gradients, optimizer_states, total}: bytes behind those arrays and the optimizer's."""
    report = {"parameters": bytes_held(parameters), "gradients": bytes_held(gradients),
              "optimizer_states": bytes_held(a for slots in optimizer.state.values() for a in slots.values())}
    report["total"] = sum(report.values())
    return report


class SingleReplica:
    """The interface (module docstring) for one data-parallel replica: gradients are already the average."""

    partitioned_over = ()  # every rank of the dp group (one here) updates whole tensors
    piece_runner = None  # how the pipeline chunks call their pieces: directly (ZeRO-3 gathers around them)

    def __init__(self, parameters):
        self.parameters = list({id(p): p for p in parameters}.values())  # a tied weight listed twice counts once
        self.state = ReplicaState(self.parameters)  # its checkpoint arrays and memory report (STATE_MEMBERS)

    @property
    def updated(self):
        return self.parameters

    def updated_tensor(self, parameter):
        """What the optimizer updates for ``parameter``: here the parameter itself."""
        return parameter

    def optimizer_groups(self, groups):
        return groups

    def start_step(self):
        for p in self.parameters:
            p.grad = None

    def gradient_ready(self, parameter):
        """Grad-ready hook: with one replica nothing is sent, so it is never registered."""

    def finish_gradient_sync(self):
        for p in self.parameters:  # a parameter no micro-batch reached: zero, as data parallelism sends it
            if p.grad is None:
                p.grad = xp.zeros_like(p.data)

    def after_optimizer_step(self, step):
        """Nothing to rebuild or compare with one replica."""


class ReplicaState:
    """The state half (``STATE_MEMBERS``) of ``SingleReplica`` and of every mode that keeps whole
    parameters: what checkpoints, tests and memory reports read and write, apart from the step's
    code (``SYNC_MEMBERS``), which never sees a checkpoint."""

    def __init__(self, parameters):
        self.parameters = parameters  # the sync's list, each tensor once

    def state_arrays(self, optimizer):
        """{name: array} of state that is this rank's alone and must travel in a checkpoint for an
        exact resume (compression residuals, local SGD's drifting replicas); none here."""
        return {}

    def load_state_arrays(self, arrays, optimizer):
        """The reverse of ``state_arrays``, after the parameters and moments are loaded."""

    # ---- arrays shaped like the tensor-parallel shards (checkpoints) ---------------------------
    def parameter_arrays(self):
        """{id(p): a copy of p's array}."""
        return {id(p): p.data.copy() for p in self.parameters}

    def load_parameter(self, parameter, array):
        parameter.data[...] = array

    def gradient_arrays(self):
        """{id(p): p's averaged gradient} (after ``finish_gradient_sync``; for tests and inspection)."""
        return {id(p): p.grad for p in self.parameters}

    def optimizer_state_arrays(self, optimizer):
        """{id(p): {"m": array, "v": array}} (zeros before a first step)."""
        state = optimizer.state
        return {id(p): {slot: state[id(p)][slot].copy() if id(p) in state else xp.zeros_like(p.data)
                        for slot in MOMENTS} for p in self.parameters}

    def load_optimizer_state(self, optimizer, parameter, moments):
        optimizer.state[id(parameter)] = {slot: moments[slot].copy() for slot in MOMENTS}

    def memory_report(self, optimizer):
        """Bytes this rank holds: parameters, gradients and ``optimizer``'s state (16Ψ with fp32 AdamW)."""
        return memory_report((p.data for p in self.parameters), (p.grad for p in self.parameters), optimizer)
