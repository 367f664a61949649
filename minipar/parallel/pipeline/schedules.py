"""Pipeline schedules as data: for each rank, the ordered list of what it does in one step.

The model is cut into $p$ stages on $p$ ranks (rank = stage index) and each step's batch into
$m$ micro-batches. With interleaving, the model is cut finer, into $p·v$ chunks ("virtual
stages"), and rank $r$ holds chunks $r, r+p, r+2p, …$ (Narayanan et al. 2021, Megatron-LM).
Activations flow forward from chunk $c$ to $c+1$, gradients backward from $c+1$ to $c$,
and chunk $c$ lives on rank $c mod p$. Without interleaving there is one chunk per rank and
the chunk index equals the stage index.

A schedule is a list of ``Action(kind, microbatch, chunk)`` (``actions.py``: the eight kinds,
a forward, a whole backward or its zero-bubble split into B (input) and W (weights) (Qi et al.
2023), the sends and receives around them, and where each chunk lives). One executor runs any of them.

The first chunk has no receive-forward and no send-backward; the last has no send-forward and no
receive-backward. Every other boundary appears as a matched send/receive pair, even in the one
case where both chunks sit on the same rank (interleaving with $p = 1$); sending to yourself with a
nonblocking send followed by a receive is legal MPI.

Communication semantics, which the simulator checks and the executor must keep:

- sends are buffered: the executor posts ``Isend`` and waits for all of a step's sends at the
  end of the step, so a send never blocks;
- a receive blocks until its message is there; the executor may ``Recv``, or ``Irecv`` early and
  ``Wait`` at this action. We do not split receives into post/wait actions: a receive sits right
  before the compute that needs it, its latest possible place, and since every message carries a
  unique tag (``message_tag``) an executor is free to post all of a step's ``Irecv`` up front;
- messages are matched by tag, not by arrival order, so two messages between the same ranks
  never get mixed up;
- each send comes right after the compute that produces it, so no rank sits on a result that
  another rank waits for.

Under these rules a schedule is deadlock-free exactly when the simulator finishes it.
"""
from minipar.errors import ConfigError, require_positive_int
from minipar.parallel.pipeline.actions import (
    BACKWARD,
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    COMPUTES,
    FORWARD,
    LOOP,
    RECEIVES,
    RECV_BACKWARD,
    RECV_FORWARD,
    SEND_BACKWARD,
    SEND_FORWARD,
    SENDS,
    V_SHAPE,
    Action,
    ActionKind,
    chunks_of_stage,
    message_key,
    message_tag,
    peer_rank,
    stage_of_chunk,
)

# The vocabulary (actions.py) is offered here too, where the schedules that use it are built.
__all__ = ["BACKWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT", "COMPUTES", "FORWARD", "LOOP", "RECEIVES", "RECV_BACKWARD",
           "RECV_FORWARD", "SCHEDULE_NAMES", "SEND_BACKWARD", "SEND_FORWARD", "SENDS", "V_SHAPE", "Action", "ActionKind",
           "backward_actions", "build_all_schedules", "build_schedule", "chunks_of_stage", "chunks_per_stage",
           "forward_actions", "gpipe", "interleaved_one_f_one_b", "message_key", "message_tag", "one_f_one_b",
           "peer_rank", "placement_of", "split_backward_actions", "stage_of_chunk"]


def forward_actions(microbatch, chunk, total_chunks):
    """One chunk's forward of one micro-batch: receive (unless first), compute, send (unless last)."""
    actions = [Action(RECV_FORWARD, microbatch, chunk)] if chunk > 0 else []
    actions.append(Action(FORWARD, microbatch, chunk))
    if chunk < total_chunks - 1:
        actions.append(Action(SEND_FORWARD, microbatch, chunk))
    return actions


def backward_actions(microbatch, chunk, total_chunks):
    """One chunk's backward of one micro-batch: receive (unless last), compute, send (unless first)."""
    actions = [Action(RECV_BACKWARD, microbatch, chunk)] if chunk < total_chunks - 1 else []
    actions.append(Action(BACKWARD, microbatch, chunk))
    if chunk > 0:
        actions.append(Action(SEND_BACKWARD, microbatch, chunk))
    return actions


def split_backward_actions(microbatch, chunk, total_chunks):
    """B of one chunk's backward: receive (unless last), input gradient, send (unless first)."""
    actions = [Action(RECV_BACKWARD, microbatch, chunk)] if chunk < total_chunks - 1 else []
    actions.append(Action(BACKWARD_INPUT, microbatch, chunk))
    if chunk > 0:
        actions.append(Action(SEND_BACKWARD, microbatch, chunk))
    return actions


def _check_layout(num_stages, num_microbatches, stage, num_chunks=1):
    require_positive_int("num_stages", num_stages)
    require_positive_int("num_microbatches", num_microbatches)
    require_positive_int("num_chunks", num_chunks)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages:
        raise ConfigError(f"stage must be an integer in [0, {num_stages}), got {stage!r}")


def gpipe(num_stages, num_microbatches, stage):
    """GPipe (Huang et al. 2019): every forward of the step, then every backward.

    Backwards run in the same micro-batch order as the forwards (first in, first out), so the
    last stage can start micro-batch 0's backward straight after its last forward. With forward
    time $t_f$ and backward time $t_b$ per stage and no communication cost, the step takes
    $(m + p − 1)(t_f + t_b)$, of which each rank computes $m(t_f + t_b)$; the idle share, the bubble,
    is, as a fraction of the step,

    $$(p − 1) / (m + p − 1)$$

    which Narayanan et al. 2021 write as $(p − 1)/m$ of the ideal compute time. The price is memory:
    every rank stashes the activations of all $m$ micro-batches before its first backward.
    """
    _check_layout(num_stages, num_microbatches, stage)
    actions = []
    for microbatch in range(num_microbatches):
        actions += forward_actions(microbatch, stage, num_stages)
    for microbatch in range(num_microbatches):
        actions += backward_actions(microbatch, stage, num_stages)
    return actions


def one_f_one_b(num_stages, num_microbatches, stage):
    """1F1B, PipeDream-flush (Narayanan et al. 2021): one forward, one backward, in steady state.

    Stage $s$ runs $w = min(p − s − 1, m)$ warm-up forwards, then alternates one forward with one
    backward until its forwards are done, then drains the remaining $w$ backwards. A backward frees
    its micro-batch's activations as soon as the pipeline allows, so stage $s$ never holds more than
    $min(p − s, m) ≤ p$ micro-batches in flight, against GPipe's $m$. The bubble is unchanged,
    $(p − 1)/(m + p − 1)$ of the step: the warm-up and drain idle times are GPipe's, only reordered.
    """
    _check_layout(num_stages, num_microbatches, stage)
    ### BEGIN SOLUTION
    warmup = min(num_stages - stage - 1, num_microbatches)
    actions = []
    for microbatch in range(warmup):
        actions += forward_actions(microbatch, stage, num_stages)
    for step in range(num_microbatches - warmup):
        actions += forward_actions(warmup + step, stage, num_stages)
        actions += backward_actions(step, stage, num_stages)
    for microbatch in range(num_microbatches - warmup, num_microbatches):
        actions += backward_actions(microbatch, stage, num_stages)
    return actions
    ### END SOLUTION


def interleaved_one_f_one_b(num_stages, num_microbatches, stage, num_chunks):
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): 1F1B over $v$ chunks per rank.

    Micro-batches go through the pipeline in groups of $p$: rank $r$ runs the forwards of a group on
    its first chunk, then on its second, ..., then starts the next group; backwards visit its
    chunks in the reverse order. Rank $r$ warms up with

    $$w_r = min((v − 1)·p + 2(p − r − 1), m·v)$$

    forwards, alternates one forward with one backward, then drains. The groups of $p$ are why $m$
    must be a multiple of $p$.

    Each chunk takes $1/v$ of a stage's time, so the fill and drain shrink by $v$: the bubble is
    $(1/v)(p − 1)/m$ of the ideal compute time, that is, as a fraction of the step,

    $$((p − 1)/v) / (m + (p − 1)/v)$$

    bought with $v$ times as many messages. ``num_chunks=1`` gives plain 1F1B (``one_f_one_b``),
    with no constraint on $m$.

    Why the warm-up holds $2(p − r − 1)$ and not 1F1B's $p − r − 1$ forwards beyond $(v − 1)·p$: if
    messages were free, $p − r − 1$ would do; the simulator gives the same step time with it and
    less stashed memory. The extra $p − r − 1$ forwards are slack for communication: they let a
    rank keep computing while a message is in flight, so send latency mostly hides behind
    compute instead of adding to every steady-state step (try ``simulate(..., send_time=0.5)``
    both ways). The price is memory: rank $r$ stashes up to $min((v − 1)·p + 2(p − r − 1) + 1, m·v)$
    (micro-batch, chunk) pairs, each $1/v$ of a stage's activations.
    """
    _check_layout(num_stages, num_microbatches, stage, num_chunks)
    if num_chunks == 1:
        return one_f_one_b(num_stages, num_microbatches, stage)
    if num_microbatches % num_stages != 0:
        raise ConfigError(
            f"the interleaved schedule needs num_microbatches to be a multiple of num_stages, "
            f"got num_microbatches={num_microbatches} and num_stages={num_stages}")
    total_chunks = num_stages * num_chunks
    units = num_microbatches * num_chunks  # (micro-batch, chunk) pairs on this rank

    def unit(index, backward):
        group, position = divmod(index, total_chunks)
        local_chunk = position // num_stages
        if backward:
            local_chunk = num_chunks - 1 - local_chunk
        microbatch = group * num_stages + position % num_stages
        return microbatch, stage + local_chunk * num_stages

    warmup = min((num_chunks - 1) * num_stages + 2 * (num_stages - stage - 1), units)
    actions = []
    for index in range(warmup):
        actions += forward_actions(*unit(index, backward=False), total_chunks)
    for step in range(units - warmup):
        actions += forward_actions(*unit(warmup + step, backward=False), total_chunks)
        actions += backward_actions(*unit(step, backward=True), total_chunks)
    for index in range(units - warmup, units):
        actions += backward_actions(*unit(index, backward=True), total_chunks)
    return actions


SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zbv")


def chunks_per_stage(name, num_chunks=1):
    """How many chunks each rank holds under schedule ``name``: ZB-V always 2, else ``num_chunks``."""
    return 2 if name == "zbv" else num_chunks


def placement_of(name):
    """The chunk placement of schedule ``name``: V_SHAPE for ZB-V, LOOP for every other."""
    return V_SHAPE if name == "zbv" else LOOP


def build_schedule(name, num_stages, num_microbatches, stage, num_chunks=1):
    """The actions of rank ``stage`` under the schedule called ``name``.

    ``name`` is one of "gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zbv". gpipe, 1f1b,
    zb-h1 and zb-h2 hold one chunk per rank, so they need num_chunks = 1; "interleaved" with
    num_chunks = 1 is 1f1b; zbv holds two chunks per rank (``chunks_per_stage``) in a V.
    """
    if name not in SCHEDULE_NAMES:
        raise ConfigError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULE_NAMES}")
    if name in ("zb-h1", "zb-h2", "zbv"):
        from minipar.parallel.pipeline.zero_bubble import zero_bubble  # it builds on this module

        if num_chunks != chunks_per_stage(name):
            raise ConfigError(f"the {name!r} schedule holds {chunks_per_stage(name)} chunk(s) per rank, "
                              f"got num_chunks={num_chunks}")
        return zero_bubble(name, num_stages, num_microbatches, stage)
    if name == "interleaved":
        return interleaved_one_f_one_b(num_stages, num_microbatches, stage, num_chunks)
    _check_layout(num_stages, num_microbatches, stage, num_chunks)
    if num_chunks != 1:
        raise ConfigError(
            f"the {name!r} schedule holds one chunk per rank, got num_chunks={num_chunks}; "
            f"use 'interleaved' for several")
    return gpipe(num_stages, num_microbatches, stage) if name == "gpipe" else \
        one_f_one_b(num_stages, num_microbatches, stage)


def build_all_schedules(name, num_stages, num_microbatches, num_chunks=None):
    """Every rank's actions, as a list indexed by rank (what the simulator takes).

    ``num_chunks`` defaults to the schedule's own (2 for zbv, else 1)."""
    num_chunks = chunks_per_stage(name) if num_chunks is None else num_chunks
    return [build_schedule(name, num_stages, num_microbatches, stage, num_chunks)
            for stage in range(num_stages)]
