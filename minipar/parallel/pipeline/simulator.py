"""Run pipeline schedules on paper: check them and time them, no MPI needed.

``simulate(schedules_per_rank)`` plays every rank's list of ``Action``s with the executor's
rules (see ``schedules``): compute takes ``forward_time`` or ``backward_time``, or, split in two
for the zero-bubble schedules, B takes ``backward_time - weight_time`` and W ``weight_time`` (the
paper's T_B and T_W, so a whole backward costs the same either way); a send never
blocks and its message can be received ``send_time`` later; a receive waits until its message
has arrived. Messages are matched by (direction, micro-batch, chunk boundary), like MPI tags.

Before timing anything it checks that the schedules describe one whole training step
(``check_schedules``, in schedule_checks.py).

Then it runs the ranks; if some rank is left waiting on a message that nobody will ever send, it
raises ``DeadlockError`` naming each stuck rank and the receive it waits on.

Bubble fraction, precisely: with p ranks and makespan T (the time the last action ends; every
rank starts at 0), each rank computes for its summed forward and backward durations, and

    bubble_fraction = 1 - (total compute time over all ranks) / (p · T)

is the share of the p·T rank-seconds spent not computing: waiting on receives, or done early.
With send_time = 0 this is the quantity the formulas in ``schedules`` predict.
"""
from dataclasses import dataclass

from minipar.errors import ConfigError
from minipar.parallel.pipeline.schedule_checks import ScheduleError, check_schedules
from minipar.parallel.pipeline.schedules import (
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
    message_key,
)

__all__ = ["DeadlockError", "Interval", "ScheduleError", "SimulationResult", "check_schedules",
           "message_key", "simulate"]


class DeadlockError(ScheduleError):
    """Schedules whose ranks wait on each other forever."""


@dataclass(frozen=True)
class Interval:
    """What one rank did from ``start`` to ``end`` (a receive's interval is its wait).

    It also reads as a trace event (``name``, ``category``, ``args``), so ``minipar.trace`` can
    draw a simulated step exactly as it draws a measured one.
    """

    rank: int
    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float

    @property
    def category(self):
        return {RECV_FORWARD: "recv", RECV_BACKWARD: "recv",
                SEND_FORWARD: "send", SEND_BACKWARD: "send"}.get(self.kind, str(self.kind))

    @property
    def name(self):
        return f"{self.kind} mb{self.microbatch} chunk{self.chunk}"

    @property
    def args(self):
        return {"microbatch": self.microbatch, "chunk": self.chunk}


@dataclass
class SimulationResult:
    timeline: list          # timeline[rank] = that rank's Intervals in the order it ran them
    makespan: float
    bubble_fraction: float
    peak_in_flight: list    # peak_in_flight[rank] = most (micro-batch, chunk) pairs stashed at once
    compute_time: list      # compute_time[rank] = summed forward and backward (B and W) durations
    num_microbatches: int
    num_chunks: int         # chunks in the whole model (p·v)
    placement: str = LOOP   # where the chunks sit: LOOP (c on rank c mod p) or V_SHAPE (ZB-V)

    @property
    def in_span_bubble_fraction(self):
        """The idle share inside each rank's own span, from its first compute to its last.

        What is left if the step's end did not wait for every rank: consecutive steps then
        overlap (stage 0 starts the next step's forwards while the last stage finishes this
        one), which is what the zero-bubble paper's optimizer post-validation allows. For
        ZB-H2 it is 0 with equal times, while ``bubble_fraction`` keeps the $(p−1)T_F$ skew.
        """
        spans = []
        for intervals in self.timeline:
            computes = [interval for interval in intervals if interval.kind in COMPUTES]
            spans.append(computes[-1].end - computes[0].start if computes else 0)
        return 1 - sum(self.compute_time) / sum(spans)


def simulate(schedules_per_rank, forward_time=1.0, backward_time=2.0, send_time=0, weight_time=None):
    """Check, then run, one step of the given per-rank schedules; return a ``SimulationResult``.

    ``backward_time`` is a whole backward (T_B + T_W); ``weight_time`` is its W part, T_W, by
    default half of it (the paper's T_F = T_B = T_W when backward_time = 2 forward_time).

    ``schedules_per_rank[r]`` is rank r's list of ``Action``s. Times are per action: with
    interleaving each chunk is 1/v of a stage, so pass the stage times divided by v to compare
    makespans with a non-interleaved schedule. Any numbers work; pass ``fractions.Fraction``
    for all three times to get exact makespans and bubbles.

    ``peak_in_flight[r]`` is the most (micro-batch, chunk) pairs rank r has run forward but not
    yet finished backward (whole, or its W) at any moment: the activations it must keep stashed,
    each one chunk's worth. (After B a chunk still keeps what W needs, the inputs of its
    weights' products, so it counts until W.)
    """
    weight_time = backward_time / 2 if weight_time is None else weight_time
    for name, value in (("forward_time", forward_time), ("backward_time", backward_time)):
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value!r}")
    if not 0 < weight_time < backward_time:
        raise ConfigError(f"weight_time must be in (0, backward_time = {backward_time!r}), got {weight_time!r}")
    if not send_time >= 0:
        raise ConfigError(f"send_time must be non-negative, got {send_time!r}")
    num_microbatches, total_chunks, placement = check_schedules(schedules_per_rank)
    durations = {FORWARD: forward_time, BACKWARD: backward_time,
                 BACKWARD_INPUT: backward_time - weight_time, BACKWARD_WEIGHT: weight_time}
    ranks = [_RankState(schedule) for schedule in schedules_per_rank]
    arrival = {}  # message key -> time the receiver can have it
    # A rank's timing depends only on when its messages arrive, so running each rank until it
    # blocks, round after round, gives the same times as any interleaving of real ranks.
    progress = True
    while progress:
        progress = False
        for rank, state in enumerate(ranks):
            progress |= state.run_until_blocked(rank, arrival, durations, send_time)
    stuck = [rank for rank, state in enumerate(ranks) if not state.finished]
    if stuck:
        waits = ", ".join(f"rank {rank} waits at action {ranks[rank].next_action}: "
                          f"{ranks[rank].schedule[ranks[rank].next_action]!r}" for rank in stuck)
        raise DeadlockError(f"deadlock: {len(stuck)} of {len(ranks)} ranks can never finish; {waits}")
    makespan = max(state.clock for state in ranks)
    compute_time = [state.compute_time for state in ranks]
    return SimulationResult(timeline=[state.timeline for state in ranks], makespan=makespan,
                            bubble_fraction=1 - sum(compute_time) / (len(ranks) * makespan),
                            peak_in_flight=[state.peak_in_flight for state in ranks], compute_time=compute_time,
                            num_microbatches=num_microbatches, num_chunks=total_chunks, placement=placement)


class _RankState:
    """One simulated rank: its schedule, how far it got, its clock and what it recorded."""

    def __init__(self, schedule):
        self.schedule, self.next_action = schedule, 0
        self.clock = self.compute_time = 0
        self.stashed = self.peak_in_flight = 0
        self.timeline = []

    @property
    def finished(self):
        return self.next_action == len(self.schedule)

    def run_until_blocked(self, rank, arrival, durations, send_time):
        """Run actions until a receive whose message has not been sent; return whether any ran.

        A send never blocks and posts its message's arrival time in ``arrival``; a receive
        takes its message out of it.
        """
        progressed = False
        while not self.finished:
            action = self.schedule[self.next_action]
            start = self.clock
            if action.kind in RECEIVES:
                key = message_key(action)
                if key not in arrival:
                    break  # blocked: try the other ranks
                end = max(start, arrival.pop(key))
            elif action.kind in SENDS:
                arrival[message_key(action)] = start + send_time
                end = start
            else:
                end = start + durations[action.kind]
                self.compute_time += end - start
                if action.kind != BACKWARD_INPUT:  # F stashes; a whole backward or W frees
                    self.stashed += 1 if action.kind == FORWARD else -1
                self.peak_in_flight = max(self.peak_in_flight, self.stashed)
            self.timeline.append(Interval(rank, action.kind, action.microbatch, action.chunk, start, end))
            self.clock = end
            self.next_action += 1
            progressed = True
        return progressed
