"""Checks for ZB-H1 written as data (``zb_h1`` in minipar/parallel/pipeline/zero_bubble.py).

The contract is the zero-bubble paper's (Qi et al. 2023, section 2), read off the simulator
with exact fractions and unit times $T_F = T_B = T_W = 1$, for $p$ = 1, 2, 3, 4 and 8 stages
and every $m$ in $[p, 16]$:

- each stage runs every micro-batch's F, B and W once, backward split (no whole BACKWARD), and
  each send comes straight after the F or B that made it (a send put off holds up the next stage);
- the simulator accepts the $p$ lists (B after its F, W after its B, no deadlock);
- every rank idles exactly $p − 1$ (1F1B idles $3(p − 1)$): a bubble of $(p − 1)/(3m + p − 1)$;
- every stage holds $min(p, m)$ micro-batches between F and W, 1F1B's stage-0 peak, never more;

then the executor runs the student's schedule on 2 and 4 ranks for 2 steps, recomputation off
and on, and every stage's gradients equal one process's in float64.
"""
from fractions import Fraction

from minipar.course.checking import Check, CheckFailure
from minipar.course.checks_pipeline import _pipeline_gradients

LAYOUTS = [(p, m) for p in (1, 2, 3, 4, 8) for m in range(p, 17)]


def _schedules(p, m):
    from minipar.parallel.pipeline.zero_bubble import zb_h1

    return [list(zb_h1(p, m, stage)) for stage in range(p)]


def _each_once_and_sends_in_place(p, m, stage, actions):
    from minipar.parallel.pipeline.schedules import (
        BACKWARD,
        BACKWARD_INPUT,
        BACKWARD_WEIGHT,
        FORWARD,
        SEND_BACKWARD,
        SEND_FORWARD,
    )

    where = f"zb-h1, p = {p}, m = {m}: stage {stage}"
    if any(action.kind == BACKWARD for action in actions):
        raise CheckFailure(f"{where} runs a whole BACKWARD; ZB-H1 splits it into B (split_backward_actions) and "
                           "W (Action(BACKWARD_WEIGHT, k, stage)) so W can wait")
    for kind, label in ((FORWARD, "F"), (BACKWARD_INPUT, "B"), (BACKWARD_WEIGHT, "W")):
        done = sorted(action.microbatch for action in actions if action.kind == kind)
        if done != list(range(m)) or any(action.chunk != stage for action in actions if action.kind == kind):
            raise CheckFailure(f"{where} runs {label} on micro-batches {done}, expected each of 0 … {m - 1} once, "
                               f"on chunk {stage}")
    made_by = {SEND_FORWARD: FORWARD, SEND_BACKWARD: BACKWARD_INPUT}
    for index, action in enumerate(actions):
        if action.kind in made_by:
            before = actions[index - 1] if index else None
            if before is None or (before.kind, before.microbatch) != (made_by[action.kind], action.microbatch):
                raise CheckFailure(f"{where}: action {index}, {action!r}, does not come straight after the "
                                   f"{made_by[action.kind].name} of micro-batch {action.microbatch} (it follows "
                                   f"{before!r}): a send put off holds up the next stage")


def check_on_paper(comm):
    from minipar.parallel.pipeline.simulator import ScheduleError, simulate

    one = Fraction(1)
    for p, m in LAYOUTS:
        schedules = _schedules(p, m)
        for stage, actions in enumerate(schedules):
            _each_once_and_sends_in_place(p, m, stage, actions)
        try:
            result = simulate(schedules, forward_time=one, backward_time=2 * one, weight_time=one, send_time=0 * one)
        except ScheduleError as error:
            raise CheckFailure(f"zb-h1, p = {p}, m = {m}: the simulator refuses the schedules: {error}") from None
        for stage in range(p):
            idle = result.makespan - result.compute_time[stage]
            if idle != p - 1:
                raise CheckFailure(
                    f"zb-h1, p = {p}, m = {m}: rank {stage} idles {idle} time units with T_F = T_B = T_W = 1, "
                    f"ZB-H1 idles exactly p − 1 = {p - 1} (1F1B idles 3(p − 1) = {3 * (p - 1)}); the bubble is "
                    f"{result.bubble_fraction}, expected (p − 1)/(3m + p − 1) = {Fraction(p - 1, 3 * m + p - 1)}: "
                    "each B's gradient must leave at once, and stage s fills the drain with the W's it put off by s")
        allowed = [min(p, m)] * p
        if list(result.peak_in_flight) != allowed:
            stage = next(s for s in range(p) if result.peak_in_flight[s] != allowed[s])
            raise CheckFailure(
                f"zb-h1, p = {p}, m = {m}: stage {stage} holds {result.peak_in_flight[stage]} micro-batches between "
                f"F and W at its peak (all stages: {list(result.peak_in_flight)}), ZB-H1 holds min(p, m) = "
                f"{min(p, m)} on every stage: p − s − 1 warm-up forwards, then stage s runs the W of micro-batch k "
                "right after the B of micro-batch k + s")


def check_on_ranks(recompute):
    def check(comm):
        from minipar.parallel.pipeline.simulator import ScheduleError, simulate

        p, m = comm.Get_size(), 2 * comm.Get_size() + 1
        try:
            simulate(_schedules(p, m))
        except ScheduleError as error:
            raise CheckFailure(f"zb-h1, p = {p}, m = {m}: not run on ranks, the simulator refuses the schedules "
                               f"(they would deadlock): {error}") from None
        _pipeline_gradients(comm, "zb-h1", recompute=recompute)

    return check


ZB_H1 = [
    Check("zb_h1 on paper (simulator, T_F = T_B = T_W), p in {1,2,3,4,8}, m in [p, 16]", (1,), check_on_paper),
    Check("zb-h1 through the executor vs one process, 2 steps", (2, 4), check_on_ranks(False), limit=15),
    Check("zb-h1 with recomputation vs one process, 2 steps", (4,), check_on_ranks(True), limit=15),
]
