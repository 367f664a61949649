"""Run one pipeline-parallel training step: this rank's list of Actions, in order.

The schedule (``schedules.py``) says what to do; this module does it. For each Action:

    RECV_FORWARD   wait for the input activation of (microbatch, chunk); it becomes a fresh leaf
                   Tensor x with requires_grad, so backward leaves dL/dx in x.grad
    FORWARD        y = chunk(x); the last chunk computes the loss and scales it by 1/m
    SEND_FORWARD   copy y into a send buffer and Isend it to the rank of chunk + 1
    RECV_BACKWARD  wait for dL/dy from the rank of chunk + 1
    BACKWARD       y.backward(dL/dy) (the last chunk: loss.backward()), which fills the chunk's
                   parameter gradients and x.grad
    SEND_BACKWARD  copy x.grad into a send buffer and Isend it to the rank of chunk - 1
    BACKWARD_INPUT   the zero-bubble B: y.backward(dL/dy, defer_weights=True, inputs=(x,)) fills
                     x.grad only and keeps the chunk's weight-gradient work (``WeightGradients``)
    BACKWARD_WEIGHT  the zero-bubble W: run that work; the parameters' gradients (and their
                     grad-ready hooks, so data-parallel buckets) are filled here

Any other kind is an error: ``run`` dispatches each kind to its own method and refuses the rest.

Why the 1/m. A step on the whole batch minimises the mean loss over its B rows. With m equal
micro-batches, the mean over $B$ is $(1/m) Σ_i$ (mean over micro-batch $i$), so backpropagating each
micro-batch's loss times 1/m, and letting gradients add up (+=) across backward calls, gives
exactly the whole-batch gradient (GPipe, Huang et al. 2019, section 2.2).

Stash. Between a micro-batch's forward and its backward the rank keeps, per (microbatch, chunk),
the chunk's input x and its output y with the graph hanging off it: that is the activation
memory a schedule trades against its bubble. GPipe holds all m at once; 1F1B (PipeDream-flush,
Narayanan et al. 2021) at most p - s on stage s. ``peak_stashed`` records the most this rank
held at once. With ``recompute=True`` the forward runs under ``no_grad`` and keeps only x;
right before the backward the forward runs again, this time recording the graph, with the same
dropout masks (``minipar.parallel.recompute``; Chen et al. 2016).

Messages. Activations and their gradients move with Isend/Irecv between preallocated buffers of
each boundary's shape, never pickled. A send buffer is not written again until its Isend has
completed; a received array is copied out of its buffer before the buffer takes the next message.
The buffers and those two rules: ``message_buffers.py``.

With p = 1 there are no messages and the step is plain gradient accumulation over micro-batches.
"""
import time
from dataclasses import dataclass, field

from minipar.backend import xp
from minipar.errors import ConfigError, ShapeError
from minipar.parallel.pipeline.message_buffers import RECEIVE_BUFFERS, MessageBuffers
from minipar.parallel.pipeline.microbatches import boundary_shapes, split_microbatches
from minipar.parallel.pipeline.schedules import (
    BACKWARD,
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    RECV_BACKWARD,
    RECV_FORWARD,
    SEND_BACKWARD,
    SEND_FORWARD,
    build_schedule,
    chunks_of_stage,
    message_tag,
    peer_rank,
    placement_of,
    stage_of_chunk,
)
from minipar.parallel.recompute import random_states, replaying
from minipar.tensor import Tensor, no_grad

# RECEIVE_BUFFERS (message_buffers.py), split_microbatches (microbatches.py), random_states and replaying
# (parallel/recompute.py) are offered here too.
__all__ = ["RECEIVE_BUFFERS", "PipelineExecutor", "random_states", "replaying", "split_microbatches"]


@dataclass
class _Stashed:
    """What the backward of one (microbatch, chunk) needs from its forward."""

    input: object  # the chunk's input: ids (first chunk) or a leaf Tensor that will hold dL/dx
    output: Tensor | None  # the output (or scaled loss) with its graph; None under recomputation
    random_states: list = field(default_factory=list)  # Dropout generator states, for recomputation


class PipelineExecutor(MessageBuffers):
    """Runs a pipeline schedule over this rank's chunks, one training step per ``run`` call.

    Its message buffers (``_free_send_buffer``, the receives posted ahead) come from ``MessageBuffers``."""

    def __init__(self, chunks, pp_comm, schedule_name, num_microbatches, activation_shape, dtype,
                 recompute=False, timeline=None, actions=None, loss_scale=1.0):
        """``chunks``: this rank's chunks from ``partition``; ``pp_comm``: the pipeline group's
        Communicator (rank = stage); ``activation_shape``: one micro-batch's activation between
        chunks, e.g. (b, T, C), or a list of p·v - 1 such shapes, entry c for the output of chunk c;
        ``timeline``: a ``minipar.trace.Timeline`` to record into; ``actions``: this rank's list of
        Actions to run instead of ``schedule_name``'s (a schedule written by hand, checked by the
        simulator first); ``schedule_name`` still says where the chunks sit; ``loss_scale``: what each
        micro-batch's loss is multiplied by besides 1/m before backward (1/(cp ep) when this rank's loss
        is one of cp·ep parts of its data-parallel replica's: train.py)."""
        self.chunks, self.comm = list(chunks), pp_comm
        self.num_stages, self.stage = pp_comm.size, pp_comm.rank
        self.num_microbatches = num_microbatches
        self.total_chunks = self.num_stages * len(self.chunks)
        self.placement = placement_of(schedule_name)
        expected = chunks_of_stage(self.stage, self.num_stages, len(self.chunks), self.placement)
        if not self.chunks or [chunk.index for chunk in self.chunks] != expected or \
                any(chunk.total_chunks != self.total_chunks for chunk in self.chunks):
            raise ConfigError(f"stage {self.stage} of {self.num_stages} must hold chunks {expected} of "
                              f"{self.total_chunks}, got {self.chunks}; build them with partition(pieces, "
                              f"{self.num_stages}, {self.stage}, num_chunks={len(self.chunks)}, "
                              f"placement={self.placement!r})")
        self.schedule = list(actions) if actions is not None else \
            build_schedule(schedule_name, self.num_stages, num_microbatches, self.stage, len(self.chunks))
        self.chunk_by_index = {chunk.index: chunk for chunk in self.chunks}
        self.boundary_shapes, self.dtype = boundary_shapes(activation_shape, self.total_chunks), xp.dtype(dtype)
        self.recompute, self.timeline, self.loss_scale = recompute, timeline, loss_scale
        self.peak_stashed = 0  # most (micro-batch, chunk) pairs held between F and the end of backward (or W)
        self.loss_stage = stage_of_chunk(self.total_chunks - 1, self.num_stages, self.placement)
        self._run_action = {RECV_FORWARD: self._receive, RECV_BACKWARD: self._receive,
                            SEND_FORWARD: self._send, SEND_BACKWARD: self._send, FORWARD: self._forward,
                            BACKWARD: self._backward, BACKWARD_INPUT: self._backward,
                            BACKWARD_WEIGHT: self._backward_weight}
        self.schedule_splits_backward = any(action.kind == BACKWARD_WEIGHT for action in self.schedule)
        unknown = [action for action in self.schedule if action.kind not in self._run_action]
        if unknown:  # refused here, before any receive is posted
            raise ConfigError(f"stage {self.stage}: the schedule holds {unknown[0]!r}, whose kind "
                              f"{unknown[0].kind!r} this executor does not know how to run")
        self._allocate_buffers()  # message_buffers.py

    # ---- one step --------------------------------------------------------------------------

    def run(self, micro_inputs, micro_targets):
        """One step's forwards and backwards; gradients accumulate into the chunks' parameters.

        ``micro_inputs[i]`` / ``micro_targets[i]``: micro-batch i (see ``split_microbatches``);
        only the ranks holding the first / last chunk read them (others may pass None). Returns
        the mean loss over the micro-batches on the rank holding the last chunk, None elsewhere.
        """
        self._check_feed(micro_inputs, micro_targets)
        self._inputs, self._targets = micro_inputs, micro_targets
        self._stash, self._received, self._outgoing, self._losses = {}, {}, {}, []
        self._weights = {}  # (microbatch, chunk) -> WeightGradients that B left for W
        self._last_event_end = time.perf_counter()
        self._start_receives()  # the first RECEIVE_BUFFERS receives posted (message_buffers.py)
        for action in self.schedule:
            run_action = self._run_action.get(action.kind)
            if run_action is None:
                raise ConfigError(f"stage {self.stage}: the schedule holds {action!r}, whose kind "
                                  f"{action.kind!r} this executor does not know how to run")
            run_action(action)
            self._reclaim_completed_sends()  # also lets MPI progress large sends between actions
        started = time.perf_counter()
        self._wait_for_sends()  # the step is over only when its messages are out
        self._record("send-wait", "send", started)
        assert not (self._stash or self._received or self._outgoing or self._weights), "schedule left work behind"
        if self.chunk_by_index.get(self.total_chunks - 1) is None:
            return None
        return sum(self._losses) / self.num_microbatches

    def _check_feed(self, micro_inputs, micro_targets):
        for needed, feed, what in ((0 in self.chunk_by_index, micro_inputs, "micro_inputs"),
                                   (self.total_chunks - 1 in self.chunk_by_index, micro_targets, "micro_targets")):
            if needed and (feed is None or len(feed) != self.num_microbatches):
                got = "None" if feed is None else f"{len(feed)} entries"
                raise ConfigError(f"stage {self.stage}: {what} must hold one array per micro-batch "
                                  f"({self.num_microbatches}), got {got}")

    # ---- compute ---------------------------------------------------------------------------

    def _run_chunk(self, chunk, x, microbatch):
        """(output, loss value): the last chunk's output is its micro-batch loss scaled by 1/m."""
        if not chunk.is_last:
            return chunk(x), None
        loss = chunk(x, self._targets[microbatch])
        return loss * (self.loss_scale / self.num_microbatches), loss.data.astype(xp.float64)  # stays on the device

    def _forward(self, action):
        started = time.perf_counter()
        chunk = self.chunk_by_index[action.chunk]
        key = (action.microbatch, action.chunk)
        x = self._inputs[action.microbatch] if chunk.is_first else self._received.pop(("activation", *key))
        if self.recompute:
            states = random_states(chunk)
            with no_grad():
                output, loss = self._run_chunk(chunk, x, action.microbatch)
            self._stash[key] = _Stashed(x, None, states)
        else:
            output, loss = self._run_chunk(chunk, x, action.microbatch)
            self._stash[key] = _Stashed(x, output)
        self.peak_stashed = max(self.peak_stashed, len(self._stash) + len(self._weights))
        if chunk.is_last:
            self._losses.append(loss)
        else:
            self._outgoing[("activation", *key)] = output.data
        self._record("forward", "forward", started, action)

    def _backward(self, action):
        """BACKWARD, or the zero-bubble B (BACKWARD_INPUT) that leaves the weights for W."""
        started = time.perf_counter()
        chunk = self.chunk_by_index[action.chunk]
        key = (action.microbatch, action.chunk)
        stashed = self._stash.pop(key)
        output = stashed.output
        if self.recompute:  # rebuild the graph from the kept input, with the same dropout masks
            with replaying(chunk, stashed.random_states):
                output, _ = self._run_chunk(chunk, stashed.input, action.microbatch)
        grad = None if chunk.is_last else self._received.pop(("gradient", *key))
        if action.kind == BACKWARD_INPUT:  # x is the one leaf whose gradient B computes
            inputs = () if chunk.is_first else (stashed.input,)
            self._weights[key] = output.backward(grad, defer_weights=True, inputs=inputs)
        else:
            output.backward(grad)
        if not chunk.is_first:
            grad = stashed.input.grad
            if grad is None:  # the chunk did not use its input: the gradient is zero
                grad = xp.zeros(self.boundary_shapes[action.chunk - 1], self.dtype)
            self._outgoing[("gradient", *key)] = grad
        self._record(str(action.kind), str(action.kind), started, action)

    def _backward_weight(self, action):
        """The zero-bubble W: the weight gradients B left behind, summed as a whole backward would."""
        started = time.perf_counter()
        self._weights.pop((action.microbatch, action.chunk)).run()
        self._record(str(action.kind), str(action.kind), started, action)

    # ---- communication (the buffers: message_buffers.py) -----------------------------------

    def _receive(self, action):
        started = time.perf_counter()
        ### BEGIN SOLUTION
        posted_action, buffer, request = self._posted_receives.popleft()
        assert posted_action == action, f"receives out of order: posted {posted_action!r}, running {action!r}"
        request.wait()
        fresh = buffer.copy()  # owned by the graph; the buffer goes straight back to MPI
        self._free_receive_buffers[buffer.shape].append(buffer)
        self._post_receives()
        key = (action.microbatch, action.chunk)
        if action.kind == RECV_FORWARD:
            self._received[("activation", *key)] = Tensor(fresh, requires_grad=True)
        else:
            self._received[("gradient", *key)] = fresh
        ### END SOLUTION
        self._record("recv-wait", "recv", started, action)

    def _send(self, action):
        started = time.perf_counter()
        ### BEGIN SOLUTION
        direction = "activation" if action.kind == SEND_FORWARD else "gradient"
        payload = self._outgoing.pop((direction, action.microbatch, action.chunk))
        shape = self._shape_of(action)
        if payload.shape != shape or payload.dtype != self.dtype:
            raise ShapeError(f"stage {self.stage}: chunk {action.chunk} produced a {direction} of shape "
                             f"{payload.shape} and dtype {payload.dtype}, but the executor was built for "
                             f"shape {shape} at that boundary and dtype={self.dtype}")
        buffer = self._free_send_buffer(action)
        buffer[...] = payload
        request = self.comm.isend(buffer, peer_rank(action, self.num_stages, self.placement),
                                  message_tag(action, self.total_chunks))
        self._sends_in_flight.append((buffer, request))
        ### END SOLUTION
        self._record("send", "send", started, action)

    # ---- instrumentation -------------------------------------------------------------------

    def _record(self, name, category, started, action=None):
        """Record [started, now] in the timeline, and the gap before it as idle time.

        The gap is time on no action at all: stash bookkeeping and Python between actions.
        Waiting for a message that has not arrived shows up as ``recv`` time instead.
        """
        finished = time.perf_counter()
        if self.timeline is not None:
            args = {} if action is None else {"microbatch": action.microbatch, "chunk": action.chunk}
            if started > self._last_event_end:
                self.timeline.record("idle", "idle", self._last_event_end, started)
            label = name if action is None else f"{name} mb{action.microbatch} chunk{action.chunk}"
            self.timeline.record(label, category, started, finished, **args)
        self._last_event_end = finished
