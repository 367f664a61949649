"""Is a set of per-rank schedules one whole, consistent training step? Checked on paper, no MPI.

``check_schedules(schedules_per_rank)`` is what ``simulate`` (simulator.py) runs before timing
anything, and what a schedule written by hand must pass. It checks that the schedules describe
one whole training step:

- every action's chunk lives on the rank that runs it (chunk c on rank c mod p);
- every (micro-batch, chunk) has exactly one forward and one backward (whole, or B then W), and
  the receives and sends its position in the pipeline calls for (none into the first chunk or
  past the last);
- each chunk is run by one rank, and the chunks sit where a known placement puts them (round
  robin, or the V of ZB-V);
- every send has exactly one matching receive, and every receive one send;
- on each rank, receive-forward < forward < send-forward, forward < backward, and
  receive-backward < backward < send-backward for the same (micro-batch, chunk).
"""
from collections import Counter

from minipar.errors import ConfigError
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
    message_key,
    stage_of_chunk,
)
from minipar.parallel.pipeline.schedules import backward_actions, forward_actions, split_backward_actions


class ScheduleError(ConfigError):
    """A schedule that does not describe one whole, consistent training step."""


# Pairs (earlier, later) that must appear in this order on a rank for the same (micro-batch, chunk).
_ORDER_RULES = ((RECV_FORWARD, FORWARD), (FORWARD, SEND_FORWARD), (FORWARD, BACKWARD),
                (RECV_BACKWARD, BACKWARD), (BACKWARD, SEND_BACKWARD), (FORWARD, BACKWARD_INPUT),
                (RECV_BACKWARD, BACKWARD_INPUT), (BACKWARD_INPUT, SEND_BACKWARD),
                (BACKWARD_INPUT, BACKWARD_WEIGHT))


def _listed(problems, limit=8):
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def check_schedules(schedules_per_rank):
    """Raise ``ScheduleError`` unless the schedules form one whole step; return (m, p·v, placement)."""
    num_ranks = len(schedules_per_rank)
    if num_ranks == 0:
        raise ScheduleError("no schedules given: need one action list per rank")
    placed = [(rank, action) for rank, schedule in enumerate(schedules_per_rank)
              for action in schedule]
    if not placed:
        raise ScheduleError("every rank's schedule is empty")
    placement = _check_placement(placed, num_ranks)
    _check_messages(placed)
    num_microbatches = 1 + max(action.microbatch for _, action in placed)
    total_chunks = 1 + max(action.chunk for _, action in placed)
    total_chunks += -total_chunks % num_ranks  # round up: the top chunks may be missing outright
    _check_whole_step(placed, num_microbatches, total_chunks)
    for rank, schedule in enumerate(schedules_per_rank):
        _check_order(rank, schedule)
    return num_microbatches, total_chunks, placement


def _check_placement(placed, num_ranks):
    """Every action is an Action with non-negative indices, run by the rank its chunk lives on
    under one placement (round robin, else the V of ZB-V); returns that placement."""
    for rank, action in placed:
        if not isinstance(action, Action) or not isinstance(action.kind, ActionKind):
            raise ScheduleError(f"rank {rank}: {action!r} is not an Action with an ActionKind")
        if action.microbatch < 0 or action.chunk < 0:
            raise ScheduleError(f"rank {rank}: {action!r} has a negative index")
    for placement in (LOOP, V_SHAPE):
        if all(stage_of_chunk(action.chunk, num_ranks, placement) == rank for rank, action in placed):
            return placement
    rank, action = next((rank, action) for rank, action in placed
                        if stage_of_chunk(action.chunk, num_ranks) != rank)
    raise ScheduleError(
        f"rank {rank} runs {action!r}, but chunk {action.chunk} lives on rank "
        f"{stage_of_chunk(action.chunk, num_ranks)} of {num_ranks} (and the V placement does not fit either)")


def _check_messages(placed):
    """Matched like MPI tags: each message (``message_key``) has exactly one send and one receive."""
    sends = Counter(message_key(action) for _, action in placed if action.kind in SENDS)
    receives = Counter(message_key(action) for _, action in placed if action.kind in RECEIVES)
    unmatched = []
    for rank, action in placed:
        key = None if action.kind in COMPUTES else message_key(action)
        if key is not None and (sends[key] != 1 or receives[key] != 1):
            unmatched.append(f"rank {rank}: {action!r} is one of {sends[key]} sends and "
                             f"{receives[key]} receives of its message")
    if unmatched:
        raise ScheduleError("every send needs exactly one receive and every receive exactly "
                            "one send: " + _listed(unmatched))


def _check_whole_step(placed, num_microbatches, total_chunks):
    """Each (micro-batch, chunk) has the actions ``forward_actions`` and ``backward_actions`` list, once;
    or, where its backward is split, ``split_backward_actions`` and one BACKWARD_WEIGHT."""
    found = Counter((action.kind, action.microbatch, action.chunk) for _, action in placed)
    expected = Counter()
    for microbatch in range(num_microbatches):
        for chunk in range(total_chunks):
            if found[(BACKWARD_INPUT, microbatch, chunk)] or found[(BACKWARD_WEIGHT, microbatch, chunk)]:
                backward = split_backward_actions(microbatch, chunk, total_chunks) + \
                    [Action(BACKWARD_WEIGHT, microbatch, chunk)]
            else:
                backward = backward_actions(microbatch, chunk, total_chunks)
            unit = forward_actions(microbatch, chunk, total_chunks) + backward
            expected.update((action.kind, action.microbatch, action.chunk) for action in unit)
    wrong = []
    for key in sorted(set(found) | set(expected), key=str):
        if found[key] != expected[key]:
            kind, microbatch, chunk = key
            wrong.append(f"{kind.name}(microbatch={microbatch}, chunk={chunk}) appears "
                         f"{found[key]} times, expected {expected[key]}")
    if wrong:
        raise ScheduleError(f"the schedules are not one whole step of {num_microbatches} "
                            f"micro-batches over {total_chunks} chunks: " + _listed(wrong))


def _check_order(rank, schedule):
    """On one rank, the ``_ORDER_RULES`` pairs of each (micro-batch, chunk) come in order."""
    position = {(a.kind, a.microbatch, a.chunk): index for index, a in enumerate(schedule)}
    for earlier, later in _ORDER_RULES:
        for (kind, microbatch, chunk), index in position.items():
            before = position.get((earlier, microbatch, chunk))
            if kind == later and before is not None and before > index:
                raise ScheduleError(
                    f"rank {rank} runs {later.name}(microbatch={microbatch}, chunk={chunk}) "
                    f"at position {index}, before its {earlier.name} at position {before}")
