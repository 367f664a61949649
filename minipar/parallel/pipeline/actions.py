"""The vocabulary of pipeline schedules: what one rank does, where each chunk lives, and the
tag of every message.

A schedule (``schedules.py``) is a list of ``Action(kind, microbatch, chunk)``; one executor runs any
of them:

    RECV_FORWARD   wait for the input activation of (microbatch, chunk) from the rank of chunk-1
    FORWARD        run chunk's forward on that micro-batch (the last chunk also computes the loss)
    SEND_FORWARD   send the output activation to the rank of chunk+1      (nonblocking)
    RECV_BACKWARD  wait for the gradient of (microbatch, chunk)'s output from the rank of chunk+1
    BACKWARD       run chunk's backward on that micro-batch
    SEND_BACKWARD  send the gradient of the input to the rank of chunk-1  (nonblocking)

The zero-bubble schedules (Qi et al. 2023) split BACKWARD in two:

    BACKWARD_INPUT   B: the gradient of the chunk's input only (what chunk-1 waits for); the
                     send-backward follows it
    BACKWARD_WEIGHT  W: the gradients of the chunk's weights, any time later in the step

Placement. Chunk c lives on rank c mod p ("loop", Megatron's interleaving) for every schedule
but ZB-V, whose two chunks per rank form a V ("v"): chunks 0..p-1 go down the ranks 0..p-1 and
chunks p..2p-1 come back up p-1..0, so rank r holds chunks r and 2p-1-r, rank 0 holds both the
first and the last chunk, and the boundary between chunks p-1 and p stays on rank p-1.

Messages. A send and its receive agree on (direction, micro-batch, sending chunk)
(``message_key``), numbered as one MPI tag (``message_tag``), so messages are matched by tag and
never by arrival order.
"""
from dataclasses import dataclass
from enum import StrEnum

from minipar.errors import ConfigError


class ActionKind(StrEnum):
    RECV_FORWARD = "recv_forward"
    FORWARD = "forward"
    SEND_FORWARD = "send_forward"
    RECV_BACKWARD = "recv_backward"
    BACKWARD = "backward"
    SEND_BACKWARD = "send_backward"
    BACKWARD_INPUT = "backward_input"
    BACKWARD_WEIGHT = "backward_weight"


RECV_FORWARD = ActionKind.RECV_FORWARD
FORWARD = ActionKind.FORWARD
SEND_FORWARD = ActionKind.SEND_FORWARD
RECV_BACKWARD = ActionKind.RECV_BACKWARD
BACKWARD = ActionKind.BACKWARD
SEND_BACKWARD = ActionKind.SEND_BACKWARD
BACKWARD_INPUT = ActionKind.BACKWARD_INPUT
BACKWARD_WEIGHT = ActionKind.BACKWARD_WEIGHT

SENDS = (SEND_FORWARD, SEND_BACKWARD)
RECEIVES = (RECV_FORWARD, RECV_BACKWARD)
COMPUTES = (FORWARD, BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)
LOOP, V_SHAPE = "loop", "v"  # chunk placements (see the module docstring)


@dataclass(frozen=True)
class Action:
    """One thing a rank does: ``kind`` on micro-batch ``microbatch`` of global chunk ``chunk``."""

    kind: ActionKind
    microbatch: int
    chunk: int

    def __repr__(self):
        kind = getattr(self.kind, "name", repr(self.kind))
        return f"{kind}(microbatch={self.microbatch}, chunk={self.chunk})"

    @property
    def peer_chunk(self):
        """The chunk at the other end of a send or receive (None for compute)."""
        if self.kind in (SEND_FORWARD, RECV_BACKWARD):
            return self.chunk + 1
        if self.kind in (RECV_FORWARD, SEND_BACKWARD):
            return self.chunk - 1
        return None


def stage_of_chunk(chunk, num_stages, placement=LOOP):
    """The rank holding global chunk ``chunk``: round-robin ("loop"), or down and back up ("v")."""
    if placement == V_SHAPE:
        position = chunk % (2 * num_stages)
        return position if position < num_stages else 2 * num_stages - 1 - position
    if placement != LOOP:
        raise ConfigError(f"unknown chunk placement {placement!r}; choose {LOOP!r} or {V_SHAPE!r}")
    return chunk % num_stages


def chunks_of_stage(stage, num_stages, num_chunks, placement=LOOP):
    """The global chunks rank ``stage`` holds, in increasing order."""
    return [chunk for chunk in range(num_stages * num_chunks)
            if stage_of_chunk(chunk, num_stages, placement) == stage]


def peer_rank(action, num_stages, placement=LOOP):
    """The rank a send goes to, or a receive comes from."""
    if action.peer_chunk is None:
        raise ConfigError(f"{action!r} is compute and has no peer rank")
    return stage_of_chunk(action.peer_chunk, num_stages, placement)


def message_key(action):
    """What a send and its receive agree on: (direction, micro-batch, sending chunk).

    Direction 0 is an activation (forward), 1 a gradient (backward). The simulator matches
    messages by this key; ``message_tag`` numbers it for MPI.
    """
    if action.peer_chunk is None:
        raise ConfigError(f"{action!r} is compute and sends no message")
    sending_chunk = action.chunk if action.kind in SENDS else action.peer_chunk
    direction = 0 if action.kind in (SEND_FORWARD, RECV_FORWARD) else 1
    return direction, action.microbatch, sending_chunk


def message_tag(action, total_chunks):
    """The MPI tag shared by a send and its receive: ``message_key`` as one number.

    ``2·(microbatch·total_chunks + sending chunk) + direction``. The MPI standard guarantees
    tags up to 32767, which covers ``2·m·p·v ≤ 32768`` (for instance m = 64 micro-batches
    over 256 chunks).
    """
    direction, microbatch, sending_chunk = message_key(action)
    return 2 * (microbatch * total_chunks + sending_chunk) + direction
