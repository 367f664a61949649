"""The corpus of exercise zb_h1 (ZB-H1 as data: B and W split, each W put off so the bubble is a third of
1F1B's): wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives they
must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import ZERO_BUBBLE, Planted, region

_ZB_H1_B_BEFORE_F = """
warmup = min(num_stages - stage - 1, num_microbatches)
actions, weights_owed = [], list(range(num_microbatches))
for microbatch in range(warmup):
    actions += forward_actions(microbatch, stage, num_stages)
for step in range(num_microbatches - warmup):
    actions += split_backward_actions(step, stage, num_stages)
    if step >= stage:
        actions.append(Action(BACKWARD_WEIGHT, weights_owed.pop(0), stage))
    actions += forward_actions(warmup + step, stage, num_stages)
for microbatch in range(num_microbatches - warmup, num_microbatches):
    actions += split_backward_actions(microbatch, stage, num_stages)
    actions.append(Action(BACKWARD_WEIGHT, weights_owed.pop(0), stage))
actions += [Action(BACKWARD_WEIGHT, microbatch, stage) for microbatch in weights_owed]
return actions
"""
_ZB_H1_COUNTERS = """
warmup = min(num_stages - stage - 1, num_microbatches)
actions, forwards, backwards, weights = [], 0, 0, 0
while weights < num_microbatches:
    if forwards < num_microbatches and forwards - backwards <= warmup:
        actions += forward_actions(forwards, stage, num_stages)
        forwards += 1
    elif backwards < num_microbatches:
        actions += split_backward_actions(backwards, stage, num_stages)
        backwards += 1
        if backwards > stage or backwards > num_microbatches - warmup:
            actions.append(Action(BACKWARD_WEIGHT, weights, stage))
            weights += 1
    else:
        actions.append(Action(BACKWARD_WEIGHT, weights, stage))
        weights += 1
return actions
"""
_ZB_H1_ORDER = """
warmup = min(num_stages - stage - 1, num_microbatches)
order = [("F", k) for k in range(warmup)]
for k in range(num_microbatches - warmup):
    order += [("F", warmup + k), ("B", k)] + ([("W", k - stage)] if k >= stage else [])
done = sum(kind == "W" for kind, _ in order)
for k in range(num_microbatches - warmup, num_microbatches):
    order += [("B", k), ("W", done)]
    done += 1
order += [("W", k) for k in range(done, num_microbatches)]
actions = []
for kind, k in order:
    if kind == "W":
        actions.append(Action(BACKWARD_WEIGHT, k, stage))
    else:
        actions += (forward_actions if kind == "F" else split_backward_actions)(k, stage, num_stages)
return actions
"""

WRONG = (
    Planted("zb_h1", "no W delay: every W straight after its B", ZERO_BUBBLE,
            "        if step >= stage:  # W of micro-batch step - s: its B went s backwards ago\n",
            "        if step >= 0:  # W straight after its B\n", "ZB-H1 idles exactly p − 1"),
    Planted("zb_h1", "warm-up of p − s forwards (1F1B's count plus one)", ZERO_BUBBLE,
            "    warmup = min(num_stages - stage - 1, num_microbatches)\n",
            "    warmup = min(num_stages - stage, num_microbatches)\n", "ZB-H1 holds min(p, m)"),
    region("zb_h1", "B before its F in the steady state", ZERO_BUBBLE, {"zb_h1": _ZB_H1_B_BEFORE_F},
           "the simulator refuses the schedules"),
    Planted("zb_h1", "1F1B copied: whole backwards, no W", ZERO_BUBBLE,
            "        actions += split_backward_actions(step, stage, num_stages)\n",
            "        actions += backward_actions(step, stage, num_stages)\n", "runs a whole BACKWARD",
            more=(("from minipar.parallel.pipeline.schedules import (\n",
                   "from minipar.parallel.pipeline.schedules import (\n    backward_actions,\n"),)),
    Planted("zb_h1", "each W put off one backward too many (s + 1)", ZERO_BUBBLE,
            "        if step >= stage:  # W of micro-batch step - s: its B went s backwards ago\n",
            "        if step >= stage + 1:\n", "ZB-H1 holds min(p, m)"),
)

ALTERNATIVES = (
    region("zb_h1", "one loop with counters of F, B and W", ZERO_BUBBLE, {"zb_h1": _ZB_H1_COUNTERS}, ""),
    region("zb_h1", "the order as a list of (F/B/W, micro-batch), then the actions", ZERO_BUBBLE,
           {"zb_h1": _ZB_H1_ORDER}, ""),
)
