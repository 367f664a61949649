"""The pipeline executor's messages: preallocated buffers, receives posted ahead, sends reclaimed.

Every boundary carries arrays of one known shape: boundary c, between chunk c and chunk c + 1,
carries chunk c's output forward and its gradient back (an activation and its gradient have the
same shape). ``activation_shape`` gives one shape for every boundary or one per boundary
(``microbatches.boundary_shapes``), so messages move with Isend/Irecv between preallocated
buffers, never pickled, each with the schedule's unique tag. Two rules keep them safe:

- a send buffer is not written again until its Isend has completed (completed sends are
  reclaimed with Test; when none is free a new buffer is allocated, so a send never blocks,
  which is what the schedules' deadlock-freedom assumes); all sends are waited before
  ``run`` returns;
- a receive lands in a pooled buffer of its boundary's shape, posted ahead of time (at most
  RECEIVE_BUFFERS at once), and is copied out into a fresh array before that buffer takes the
  next message, so the graph never shares memory with MPI.

``MessageBuffers`` keeps these pools for ``PipelineExecutor`` (executor.py), whose ``_send`` and
``_receive`` (the course's exercise pipeline_messages) take their buffers from here.
"""
from collections import deque

from minipar.backend import xp
from minipar.parallel.pipeline.schedules import RECEIVES, RECV_FORWARD, SEND_BACKWARD, message_tag, peer_rank

RECEIVE_BUFFERS = 2  # receives posted ahead: double buffering, the next message lands during compute


class MessageBuffers:
    """The send and receive buffers of one executor, free or lent to a message in flight.

    A mixin of ``PipelineExecutor``: it reads the executor's ``comm``, ``schedule``,
    ``boundary_shapes``, ``dtype``, ``num_stages``, ``placement`` and ``total_chunks``.
    """

    def _allocate_buffers(self):
        """At construction: one buffer for each of the first RECEIVE_BUFFERS receives of the schedule."""
        self._free_receive_buffers, self._free_send_buffers = {}, {}  # shape -> buffers no message is using
        self._sends_in_flight = []
        for action in [a for a in self.schedule if a.kind in RECEIVES][:RECEIVE_BUFFERS]:
            self._free_receive_buffers.setdefault(self._shape_of(action), []).append(self._new_buffer(action))

    def _shape_of(self, action):
        """The shape of a send's or receive's message: that of the boundary it crosses, the one
        before the chunk (its input and that input's gradient) or after it (its output and its
        output's gradient)."""
        before = action.kind in (RECV_FORWARD, SEND_BACKWARD)
        return self.boundary_shapes[action.chunk - 1 if before else action.chunk]

    def _new_buffer(self, action):
        return xp.empty(self._shape_of(action), dtype=self.dtype)

    def _start_receives(self):
        """At the start of a step: the step's receives in schedule order, the first ones posted."""
        self._upcoming_receives = deque(a for a in self.schedule if a.kind in RECEIVES)
        self._posted_receives = deque()
        self._post_receives()

    def _post_receives(self):
        """Post the next receives of the schedule, in order, up to RECEIVE_BUFFERS at once."""
        while self._upcoming_receives and len(self._posted_receives) < RECEIVE_BUFFERS:
            action = self._upcoming_receives.popleft()
            free = self._free_receive_buffers.setdefault(self._shape_of(action), [])
            buffer = free.pop() if free else self._new_buffer(action)
            request = self.comm.irecv(buffer, peer_rank(action, self.num_stages, self.placement),
                                      message_tag(action, self.total_chunks))
            self._posted_receives.append((action, buffer, request))

    def _reclaim_completed_sends(self):
        """Move the buffers of completed sends back to the free list (Test never blocks)."""
        still_in_flight = []
        for buffer, request in self._sends_in_flight:
            if request.test():
                self._free_send_buffers.setdefault(buffer.shape, []).append(buffer)
            else:
                still_in_flight.append((buffer, request))
        self._sends_in_flight = still_in_flight

    def _free_send_buffer(self, action):
        """A buffer of the message's shape that no send is using: a reclaimed one, else a new one."""
        shape = self._shape_of(action)
        if not self._free_send_buffers.get(shape):
            self._reclaim_completed_sends()
        if self._free_send_buffers.get(shape):
            return self._free_send_buffers[shape].pop()
        return self._new_buffer(action)

    def _wait_for_sends(self):
        """The end of a step: wait for every send still in flight, and free its buffer."""
        for buffer, request in self._sends_in_flight:
            request.wait()
            self._free_send_buffers.setdefault(buffer.shape, []).append(buffer)
        self._sends_in_flight.clear()
