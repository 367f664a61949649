"""The corpus of exercise one_f_one_b (The 1F1B schedule as data, checked by the simulator, then run by the
executor): wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives
they must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import SCHEDULES, Planted, region

_ONE_F_ONE_B_COUNTERS = """
warmup = min(num_stages - stage - 1, num_microbatches)
actions, forwards, backwards = [], 0, 0
while backwards < num_microbatches:
    if forwards < num_microbatches and forwards - backwards <= warmup:
        actions += forward_actions(forwards, stage, num_stages)
        forwards += 1
    else:
        actions += backward_actions(backwards, stage, num_stages)
        backwards += 1
return actions
"""
_ONE_F_ONE_B_ORDER = """
warmup = min(num_stages - stage - 1, num_microbatches)
order = [("F", i) for i in range(warmup)]
for i in range(num_microbatches - warmup):
    order += [("F", warmup + i), ("B", i)]
order += [("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
actions = []
for kind, microbatch in order:
    actions += (forward_actions if kind == "F" else backward_actions)(microbatch, stage, num_stages)
return actions
"""
_GPIPE_ORDER = """
actions = []
for microbatch in range(num_microbatches):
    actions += forward_actions(microbatch, stage, num_stages)
for microbatch in range(num_microbatches):
    actions += backward_actions(microbatch, stage, num_stages)
return actions
"""

WRONG = (
    Planted("one_f_one_b", "one warm-up forward too many", SCHEDULES,
            "    warmup = min(num_stages - stage - 1, num_microbatches)\n",
            "    warmup = min(num_stages - stage, num_microbatches)\n", "1F1B allows min(p − s, m)"),
    Planted("one_f_one_b", "the stash popped in the wrong order (drain backwards last-in first-out)", SCHEDULES,
            "    for microbatch in range(num_microbatches - warmup, num_microbatches):\n        actions += backward",
            "    for microbatch in reversed(range(num_microbatches - warmup, num_microbatches)):\n"
            "        actions += backward", "a backward waits longer than it must"),
    Planted("one_f_one_b", "steady state runs the newest micro-batch's backward", SCHEDULES,
            "        actions += backward_actions(step, stage, num_stages)\n",
            "        actions += backward_actions(warmup + step, stage, num_stages)\n", "expected each of 0",
            limit=15),
    region("one_f_one_b", "all forwards, then all backwards (GPipe, not 1F1B)", SCHEDULES,
           {"one_f_one_b": _GPIPE_ORDER}, "1F1B allows min(p − s, m)"),
)

ALTERNATIVES = (
    region("one_f_one_b", "one loop with counters of forwards and backwards", SCHEDULES,
           {"one_f_one_b": _ONE_F_ONE_B_COUNTERS}, ""),
    region("one_f_one_b", "the order as a list of (F/B, micro-batch), then the actions", SCHEDULES,
           {"one_f_one_b": _ONE_F_ONE_B_ORDER}, ""),
)
