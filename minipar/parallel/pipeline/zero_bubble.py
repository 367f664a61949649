"""Zero-bubble schedules (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): ZB-H1, ZB-H2, ZB-V.

The backward of a chunk is two jobs. B, the gradient of the chunk's input, is on the critical
path: the previous chunk waits for it. W, the gradient of the chunk's weights, is needed by
nobody until the optimizer step. Splitting them (``BACKWARD_INPUT`` and ``BACKWARD_WEIGHT``)
lets a schedule send B's result upstream as early as possible and do W wherever a rank would
otherwise sit idle. With $T_F$, $T_B$, $T_W$ the times of F, B and W on one stage, the paper's
bubble per rank (its section 2) and what each rank holds between F and W:

| schedule | bubble per rank            | held between F and W                                       |
|----------|----------------------------|------------------------------------------------------------|
| 1F1B     | $(p−1)(T_F + T_B + T_W)$   | $p − s$ micro-batches on stage $s$ ($p$ on stage 0)        |
| ZB-H1    | $(p−1)(T_F + T_B − T_W)$   | $p$ on every stage: 1F1B's peak                            |
| ZB-H2    | $(p−1)(T_F + T_B − 2T_W)$  | $2p − 1$ on every stage                                    |
| ZB-V     | about 0                    | $2p$ half-stage chunks = $p$ stages' worth: 1F1B's peak    |

With equal times $T$ the 1F1B bubble of $3(p−1)T$ per rank shrinks to $(p−1)T$ for ZB-H1, a third.
ZB-H2's and ZB-V's "zero" is zero idle inside each rank's span from its first F to its last W;
in one step that ends with a synchronous optimizer step, the ranks still start and end
staggered, by $(p−1)T_F$ (ZB-H2) and $(p−1)T_F/2$ (ZB-V, half-stage chunks), and only overlapping
the next step's start with this one's end (the paper's optimizer post-validation, its section
4) removes that. docs/pipeline_schedules.md derives all of them.

How the schedules are built (our own rules; the tests check they reach the numbers above).

ZB-H1 keeps 1F1B's shape. Stage $s$ warms up with $p−s−1$ forwards, then alternates F and B, and
puts each W off by $s$ steps: stage $s$ runs W of micro-batch $k$ right after B of micro-batch
$k+s$. So B's gradient leaves for stage $s−1$ as soon as B is done (one $T_B$ per stage on the way
back, not $T_B + T_W$), and the W's stage $s$ put off fill the drain at the end, where 1F1B idles.
Every stage holds $p$ micro-batches between F and W: stage 0's 1F1B peak, on every stage.

ZB-H2 goes further: stage $s$ warms up with $2(p−s)−1$ forwards, exactly enough to cover the wait
for its first gradient, then repeats B, W, F with each W put off by $2s$ steps. Every stage then
computes without a gap from its first F to its last W: the step is a parallelogram, stage $s$
starting $T_F$ after stage $s−1$ and ending $T_F$ after it. Every stage holds $2p−1$ micro-batches.

ZB-V holds two chunks per rank in a V (rank $r$: chunks $r$ and $2p−1−r$), each half a stage, and
is played out with unit times by a greedy rule: at every tick a free rank runs the oldest ready B
(the later chunk first), else the ready F of the later chunk if it holds fewer than $2p$ chunks in
flight ($p$ stages' worth: 1F1B's stage-0 memory), else its oldest pending W, else waits.

The tests check, with exact fractions: ZB-H1 idles $(p−1)T$ per rank, ZB-H2 $(p−1)T_F$ with no gap
inside any rank's span, ZB-V $(p−1)T_F/2$ at $p$ = 2, 4 and 8 (within one chunk time of it
otherwise).
"""
from functools import lru_cache

from minipar.errors import ConfigError
from minipar.parallel.pipeline.schedules import (
    BACKWARD_WEIGHT,
    Action,
    _check_layout,
    chunks_of_stage,
    forward_actions,
    placement_of,
    split_backward_actions,
)

ZERO_BUBBLE_SCHEDULES = ("zb-h1", "zb-h2", "zbv")


def in_flight_limit(name, num_stages, stage):
    """The most (micro-batch, chunk) pairs stage ``stage`` may hold between F and W."""
    if name == "zb-h1":
        return num_stages
    if name == "zb-h2":
        return 2 * (num_stages - stage) - 1
    if name == "zbv":
        return 2 * num_stages
    raise ConfigError(f"unknown zero-bubble schedule {name!r}; choose one of {ZERO_BUBBLE_SCHEDULES}")


def zero_bubble(name, num_stages, num_microbatches, stage):
    """Rank ``stage``'s actions under ``name`` ("zb-h1", "zb-h2" or "zbv"); see the module docstring."""
    num_chunks = 2 if name == "zbv" else 1
    _check_layout(num_stages, num_microbatches, stage, num_chunks)
    in_flight_limit(name, num_stages, stage)  # checks the name
    if name == "zb-h1":
        return zb_h1(num_stages, num_microbatches, stage)
    if name == "zb-h2":
        return zb_h2(num_stages, num_microbatches, stage)
    return list(_v_shape(num_stages, num_microbatches)[stage])


def zb_h1(num_stages, num_microbatches, stage):
    """ZB-H1: 1F1B's order with B and W split, stage $s$ putting each W off by $s$ backwards.

    Stage $s$ runs $w = min(p − s − 1, m)$ warm-up forwards, then one F and one B (``split_backward_actions``)
    per micro-batch, and the W of micro-batch $k$ (``Action(BACKWARD_WEIGHT, k, s)``) right after the B of
    micro-batch $k + s$; then it drains: each remaining B followed by the next W, then the W's still owed,
    in micro-batch order. Its contract, graded by the course (exercise zb_h1):

    - the simulator accepts the $p$ stages' lists (every send has its receive, B after its F, W after
      its B, each send straight after the F or B that made it);
    - with $T_F = T_B = T_W = T$ every rank idles exactly $(p − 1)T$, a bubble of $(p − 1)/(3m + p − 1)$
      of the step, a third of 1F1B's $3(p − 1)T$;
    - every stage holds $min(p, m)$ micro-batches between F and W, 1F1B's stage-0 peak on every stage;
    - run by the executor, it gives one process's gradients.
    """
    _check_layout(num_stages, num_microbatches, stage)
    ### BEGIN SOLUTION
    warmup = min(num_stages - stage - 1, num_microbatches)
    actions, weights_owed = [], list(range(num_microbatches))
    for microbatch in range(warmup):
        actions += forward_actions(microbatch, stage, num_stages)
    for step in range(num_microbatches - warmup):
        actions += forward_actions(warmup + step, stage, num_stages)
        actions += split_backward_actions(step, stage, num_stages)
        if step >= stage:  # W of micro-batch step - s: its B went s backwards ago
            actions.append(Action(BACKWARD_WEIGHT, weights_owed.pop(0), stage))
    for microbatch in range(num_microbatches - warmup, num_microbatches):
        actions += split_backward_actions(microbatch, stage, num_stages)
        actions.append(Action(BACKWARD_WEIGHT, weights_owed.pop(0), stage))
    actions += [Action(BACKWARD_WEIGHT, microbatch, stage) for microbatch in weights_owed]
    return actions
    ### END SOLUTION


def zb_h2(num_stages, num_microbatches, stage):
    """ZB-H2 on one chunk per rank: $2(p − s) − 1$ warm-up forwards, then per micro-batch a B, a W put
    off by $2s$ backwards (none before), and the next F; then the drain, each B with one W, and the
    W's still owed."""
    _check_layout(num_stages, num_microbatches, stage)
    warmup = min(2 * (num_stages - stage) - 1, num_microbatches)
    actions = [action for first in range(warmup) for action in forward_actions(first, stage, num_stages)]
    weights = iter(range(num_microbatches))
    for index in range(num_microbatches):
        actions += split_backward_actions(index, stage, num_stages)
        if index >= 2 * stage or index >= num_microbatches - warmup:
            actions.append(Action(BACKWARD_WEIGHT, next(weights), stage))
        if warmup + index < num_microbatches:
            actions += forward_actions(warmup + index, stage, num_stages)
    actions += [Action(BACKWARD_WEIGHT, late, stage) for late in weights]
    return actions


@lru_cache(maxsize=64)
def _v_shape(num_stages, num_microbatches):
    """Play ZB-V's greedy rule (module docstring) with unit times; every rank's actions, as tuples."""
    name, num_chunks = "zbv", 2
    placement, total_chunks = placement_of(name), num_stages * num_chunks
    local = [chunks_of_stage(s, num_stages, num_chunks, placement) for s in range(num_stages)]
    limits = [in_flight_limit(name, num_stages, s) for s in range(num_stages)]
    next_forward = {chunk: 0 for chunk in range(total_chunks)}  # next micro-batch to go forward
    next_backward = dict(next_forward)  # F and B each visit a chunk's micro-batches in order
    forward_done, backward_done = {}, {}  # (microbatch, chunk) -> tick it finishes
    pending_weights = [[] for _ in range(num_stages)]
    in_flight, free_at = [0] * num_stages, [0] * num_stages
    actions = [[] for _ in range(num_stages)]
    remaining, tick = 3 * num_microbatches * total_chunks, 0
    while remaining:
        for s in range(num_stages):
            if free_at[s] > tick:
                continue
            chosen = _choose(s, tick, local[s], limits[s], in_flight, next_forward, next_backward,
                             forward_done, backward_done, pending_weights, num_microbatches, total_chunks)
            if chosen is None:
                continue
            kind, microbatch, chunk = chosen
            free_at[s], remaining = tick + 1, remaining - 1
            if kind == "F":
                next_forward[chunk] += 1
                in_flight[s] += 1
                forward_done[(microbatch, chunk)] = tick + 1
                actions[s] += forward_actions(microbatch, chunk, total_chunks)
            elif kind == "B":
                next_backward[chunk] += 1
                backward_done[(microbatch, chunk)] = tick + 1
                pending_weights[s].append((microbatch, chunk))
                actions[s] += split_backward_actions(microbatch, chunk, total_chunks)
            else:
                in_flight[s] -= 1
                actions[s].append(Action(BACKWARD_WEIGHT, microbatch, chunk))
        tick += 1
        if tick > 10 * (3 * num_microbatches * total_chunks + total_chunks):  # the rule always finishes
            raise RuntimeError("the ZB-V construction made no progress")  # pragma: no cover
    return tuple(tuple(rank) for rank in actions)


def _choose(s, tick, chunks, limit, in_flight, next_forward, next_backward, forward_done,
            backward_done, pending_weights, num_microbatches, total_chunks):
    """What free rank ``s`` starts at ``tick``: ("F"|"B"|"W", microbatch, chunk), or None to wait."""
    backward_ready = []
    for chunk in chunks:
        microbatch = next_backward[chunk]
        if microbatch >= num_microbatches or forward_done.get((microbatch, chunk), tick + 1) > tick:
            continue
        if chunk == total_chunks - 1 or backward_done.get((microbatch, chunk + 1), tick + 1) <= tick:
            backward_ready.append((microbatch, -chunk))
    if backward_ready:
        microbatch, negative_chunk = min(backward_ready)  # oldest micro-batch; then the later chunk
        return "B", microbatch, -negative_chunk
    if in_flight[s] < limit:
        forward_ready = []
        for chunk in chunks:
            microbatch = next_forward[chunk]
            if microbatch >= num_microbatches:
                continue
            if chunk == 0 or forward_done.get((microbatch, chunk - 1), tick + 1) <= tick:
                forward_ready.append((-chunk, microbatch))
        if forward_ready:
            negative_chunk, microbatch = min(forward_ready)  # the later chunk first: depth first
            return "F", microbatch, -negative_chunk
    if pending_weights[s]:
        return ("W", *pending_weights[s].pop(0))
    return None
