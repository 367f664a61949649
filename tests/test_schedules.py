"""Pipeline schedules, checked by running them through the simulator.

Times are exact fractions, so bubbles are compared with ``==`` against the formulas:
forward 1, backward 2 per action (per chunk when interleaved).
"""
from fractions import Fraction
from itertools import pairwise

import pytest

from minipar.errors import ConfigError
from minipar.parallel.pipeline.schedules import (
    BACKWARD,
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    COMPUTES,
    FORWARD,
    RECEIVES,
    RECV_BACKWARD,
    RECV_FORWARD,
    SEND_BACKWARD,
    SEND_FORWARD,
    SENDS,
    V_SHAPE,
    Action,
    build_all_schedules,
    build_schedule,
    chunks_of_stage,
    gpipe,
    interleaved_one_f_one_b,
    message_tag,
    one_f_one_b,
    peer_rank,
)
from minipar.parallel.pipeline.simulator import DeadlockError, ScheduleError, message_key, simulate

STAGE_COUNTS = (1, 2, 3, 4, 8)
FORWARD_TIME, BACKWARD_TIME = Fraction(1), Fraction(2)


def run(name, stages, microbatches, chunks=1, send_time=Fraction(0)):
    schedules = build_all_schedules(name, stages, microbatches, chunks)
    return simulate(schedules, FORWARD_TIME, BACKWARD_TIME, send_time)


@pytest.mark.parametrize("stages", STAGE_COUNTS)
def test_gpipe_bubble_stash_and_makespan(stages):
    for microbatches in range(1, 17):
        result = run("gpipe", stages, microbatches)
        expected = Fraction(stages - 1, microbatches + stages - 1)
        assert result.bubble_fraction == expected, microbatches
        assert result.makespan == (microbatches + stages - 1) * (FORWARD_TIME + BACKWARD_TIME)
        assert result.peak_in_flight == [microbatches] * stages, microbatches


@pytest.mark.parametrize("stages", STAGE_COUNTS)
def test_one_f_one_b_bubble_matches_gpipe_with_at_most_p_in_flight(stages):
    for microbatches in range(1, 17):
        result = run("1f1b", stages, microbatches)
        expected = Fraction(stages - 1, microbatches + stages - 1)
        assert result.bubble_fraction == expected, microbatches
        expected_stash = [min(stages - stage, microbatches) for stage in range(stages)]
        assert result.peak_in_flight == expected_stash, microbatches
        assert max(result.peak_in_flight) <= stages


@pytest.mark.parametrize("chunks", (2, 3))
@pytest.mark.parametrize("stages", STAGE_COUNTS)
def test_interleaved_bubble_is_divided_by_chunks(stages, chunks):
    # With per-chunk times t_f, t_b every rank computes m·v(t_f + t_b) and the fill and drain
    # cost (p - 1)(t_f + t_b), so the bubble is ((p-1)/v) / (m + (p-1)/v) of the step.
    for microbatches in range(stages, 17, stages):
        result = run("interleaved", stages, microbatches, chunks)
        shrunk_fill = Fraction(stages - 1, chunks)
        assert result.bubble_fraction == shrunk_fill / (microbatches + shrunk_fill), microbatches
        per_chunk = FORWARD_TIME + BACKWARD_TIME
        assert result.makespan == (microbatches * chunks + stages - 1) * per_chunk
        units = microbatches * chunks
        expected_stash = [min((chunks - 1) * stages + 2 * (stages - 1 - stage) + 1, units)
                          for stage in range(stages)]
        assert result.peak_in_flight == expected_stash, microbatches


def test_interleaving_shortens_the_step_for_the_same_model():
    stages, microbatches, chunks = 4, 8, 2
    plain = simulate(build_all_schedules("1f1b", stages, microbatches), 1.0, 2.0)
    interleaved = simulate(build_all_schedules("interleaved", stages, microbatches, chunks),
                           1.0 / chunks, 2.0 / chunks)
    assert sum(plain.compute_time) == sum(interleaved.compute_time)
    assert interleaved.makespan == (microbatches + (stages - 1) / chunks) * 3.0
    assert plain.makespan == (microbatches + stages - 1) * 3.0


def test_interleaved_with_one_chunk_is_one_f_one_b():
    for stages in STAGE_COUNTS:
        for stage in range(stages):
            assert interleaved_one_f_one_b(stages, 5, stage, 1) == one_f_one_b(stages, 5, stage)


@pytest.mark.parametrize("name,chunks", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2),
                                         ("interleaved", 3), ("zb-h1", 1), ("zb-h2", 1), ("zbv", 2)])
def test_sends_follow_their_compute_and_receives_precede_it(name, chunks):
    stages = 4
    backward = BACKWARD_INPUT if name.startswith("zb") else BACKWARD  # a send-backward follows B, not W
    for schedule in build_all_schedules(name, stages, 8, chunks):
        for index, action in enumerate(schedule):
            if action.kind in SENDS:
                producer = FORWARD if action.kind == SEND_FORWARD else backward
                assert schedule[index - 1] == Action(producer, action.microbatch, action.chunk)
            if action.kind in RECEIVES:
                consumer = FORWARD if action.kind == RECV_FORWARD else backward
                assert schedule[index + 1] == Action(consumer, action.microbatch, action.chunk)


def test_one_f_one_b_exact_order_on_two_stages():
    assert one_f_one_b(2, 3, 0) == [
        Action(FORWARD, 0, 0), Action(SEND_FORWARD, 0, 0),
        Action(FORWARD, 1, 0), Action(SEND_FORWARD, 1, 0),
        Action(RECV_BACKWARD, 0, 0), Action(BACKWARD, 0, 0),
        Action(FORWARD, 2, 0), Action(SEND_FORWARD, 2, 0),
        Action(RECV_BACKWARD, 1, 0), Action(BACKWARD, 1, 0),
        Action(RECV_BACKWARD, 2, 0), Action(BACKWARD, 2, 0)]
    assert [(a.kind, a.microbatch) for a in one_f_one_b(2, 3, 1) if a.kind in COMPUTES] == [
        (FORWARD, 0), (BACKWARD, 0), (FORWARD, 1), (BACKWARD, 1), (FORWARD, 2), (BACKWARD, 2)]


def test_interleaved_visits_chunks_in_groups_of_p():
    computes = [(a.kind, a.microbatch, a.chunk) for a in interleaved_one_f_one_b(2, 4, 1, 2)
                if a.kind in COMPUTES]
    forwards = [(mb, chunk) for kind, mb, chunk in computes if kind == FORWARD]
    backwards = [(mb, chunk) for kind, mb, chunk in computes if kind == BACKWARD]
    assert forwards == [(0, 1), (1, 1), (0, 3), (1, 3), (2, 1), (3, 1), (2, 3), (3, 3)]
    assert backwards == [(0, 3), (1, 3), (0, 1), (1, 1), (2, 3), (3, 3), (2, 1), (3, 1)]


def test_message_tags_pair_each_send_with_its_receive_and_are_unique():
    stages, chunks = 3, 2
    schedules = build_all_schedules("interleaved", stages, 6, chunks)
    sent, received = {}, {}
    for rank, schedule in enumerate(schedules):
        for action in schedule:
            if action.kind in SENDS:
                sent[message_tag(action, stages * chunks)] = (rank, peer_rank(action, stages))
            elif action.kind in RECEIVES:
                received[message_tag(action, stages * chunks)] = (peer_rank(action, stages), rank)
    assert sent == received  # same tags, and each send goes where its receive listens
    assert len(sent) == 2 * 6 * (stages * chunks - 1)


def test_send_latency_delays_the_step_by_hand_computed_amount():
    # One micro-batch over two stages: F0 [0,1], message lands at 1.5, F1 [1.5,2.5],
    # B1 [2.5,4.5], gradient lands at 5, B0 [5,7].
    result = run("1f1b", 2, 1, send_time=Fraction(1, 2))
    assert result.makespan == 7
    assert [(i.kind, i.start, i.end) for i in result.timeline[1]] == [
        (RECV_FORWARD, 0, Fraction(3, 2)), (FORWARD, Fraction(3, 2), Fraction(5, 2)),
        (BACKWARD, Fraction(5, 2), Fraction(9, 2)), (SEND_BACKWARD, Fraction(9, 2), Fraction(9, 2))]
    assert result.bubble_fraction == 1 - Fraction(6, 2 * 7)


@pytest.mark.parametrize("name,stages,microbatches,chunks",
                         [("gpipe", 3, 5, 1), ("1f1b", 4, 7, 1), ("interleaved", 4, 8, 3), ("zb-h1", 4, 7, 1),
                          ("zb-h2", 3, 5, 1), ("zbv", 4, 6, 2)])
def test_timeline_respects_every_dependency(name, stages, microbatches, chunks):
    send_time = Fraction(1, 3)
    result = run(name, stages, microbatches, chunks, send_time)

    def key(interval):
        return message_key(Action(interval.kind, interval.microbatch, interval.chunk))

    sent_at = {}
    for rank_timeline in result.timeline:
        assert all(a.end <= b.start for a, b in pairwise(rank_timeline))
        sent_at.update({key(i): i.start for i in rank_timeline if i.kind in SENDS})
    finished = {}
    for rank_timeline in result.timeline:
        for interval in rank_timeline:
            if interval.kind in RECEIVES:
                assert interval.end >= sent_at[key(interval)] + send_time
            finished[(interval.kind, interval.microbatch, interval.chunk)] = interval.end
    for (kind, microbatch, chunk), end in finished.items():
        if kind in (BACKWARD, BACKWARD_INPUT):
            assert end > finished[(FORWARD, microbatch, chunk)]
        if kind == BACKWARD_WEIGHT:
            assert end > finished[(BACKWARD_INPUT, microbatch, chunk)]
        if kind == BACKWARD_INPUT and chunk < result.num_chunks - 1:  # B waits for the next chunk's B, not its W
            assert end - (BACKWARD_TIME - FORWARD_TIME) / chunks >= finished[(BACKWARD_INPUT, microbatch, chunk + 1)]
    assert len([k for k in finished if k[0] == FORWARD]) == microbatches * stages * chunks


def test_deadlock_is_reported_with_stuck_ranks_and_their_actions():
    # Rank 0 runs micro-batches strictly one after the other; rank 1 insists on micro-batch 1
    # first. Rank 0 waits for micro-batch 0's gradient, which rank 1 will only compute after
    # micro-batch 1's activation, which rank 0 will only send after that gradient: a cycle.
    rank0 = [Action(FORWARD, 0, 0), Action(SEND_FORWARD, 0, 0),
             Action(RECV_BACKWARD, 0, 0), Action(BACKWARD, 0, 0),
             Action(FORWARD, 1, 0), Action(SEND_FORWARD, 1, 0),
             Action(RECV_BACKWARD, 1, 0), Action(BACKWARD, 1, 0)]
    rank1 = [Action(RECV_FORWARD, 1, 1), Action(FORWARD, 1, 1),
             Action(BACKWARD, 1, 1), Action(SEND_BACKWARD, 1, 1),
             Action(RECV_FORWARD, 0, 1), Action(FORWARD, 0, 1),
             Action(BACKWARD, 0, 1), Action(SEND_BACKWARD, 0, 1)]
    with pytest.raises(DeadlockError) as error:
        simulate([rank0, rank1])
    message = str(error.value)
    assert "rank 0 waits at action 2: RECV_BACKWARD(microbatch=0, chunk=0)" in message
    assert "rank 1 waits at action 0: RECV_FORWARD(microbatch=1, chunk=1)" in message
    # The same two ranks in a consistent order finish.
    rank1_fixed = rank1[4:] + rank1[:4]
    assert simulate([rank0, rank1_fixed]).makespan == 12.0


def test_send_without_receive_is_reported():
    schedules = build_all_schedules("1f1b", 2, 2)
    schedules[1].remove(Action(RECV_FORWARD, 1, 1))
    with pytest.raises(ScheduleError, match=r"SEND_FORWARD\(microbatch=1, chunk=0\) is one of "
                                            r"1 sends and 0 receives"):
        simulate(schedules)


def test_receive_without_send_is_reported():
    schedules = build_all_schedules("gpipe", 3, 2)
    schedules[2].remove(Action(SEND_BACKWARD, 0, 2))
    with pytest.raises(ScheduleError, match=r"rank 1: RECV_BACKWARD\(microbatch=0, chunk=1\) "
                                            r"is one of 0 sends and 1 receives"):
        simulate(schedules)


def test_missing_compute_wrong_rank_and_wrong_order_are_reported():
    schedules = build_all_schedules("1f1b", 2, 2)
    schedules[0].remove(Action(BACKWARD, 1, 0))
    with pytest.raises(ScheduleError, match=r"BACKWARD\(microbatch=1, chunk=0\) appears 0 times"):
        simulate(schedules)

    schedules = build_all_schedules("1f1b", 2, 2)
    schedules[0].append(Action(FORWARD, 5, 1))
    with pytest.raises(ScheduleError, match="chunk 1 lives on rank 1 of 2"):
        simulate(schedules)

    schedules = build_all_schedules("1f1b", 2, 2)
    first_forward = schedules[1].index(Action(FORWARD, 0, 1))
    schedules[1].insert(0, schedules[1].pop(first_forward))
    with pytest.raises(ScheduleError, match=r"FORWARD\(microbatch=0, chunk=1\) at position 0, "
                                            r"before its RECV_FORWARD"):
        simulate(schedules)


@pytest.mark.parametrize("call,needle", [
    (lambda: build_schedule("pipedream", 2, 4, 0), "unknown pipeline schedule 'pipedream'"),
    (lambda: build_schedule("1f1b", 2, 0, 0), "num_microbatches must be a positive integer, got 0"),
    (lambda: build_schedule("gpipe", 0, 4, 0), "num_stages must be a positive integer, got 0"),
    (lambda: build_schedule("interleaved", 2, 4, 0, 0), "num_chunks must be a positive integer"),
    (lambda: build_schedule("1f1b", 2, 4, 2), r"stage must be an integer in \[0, 2\), got 2"),
    (lambda: build_schedule("gpipe", 2, 4, 0, 2), "holds one chunk per rank, got num_chunks=2"),
    (lambda: build_schedule("interleaved", 4, 6, 0, 2),
     "multiple of num_stages, got num_microbatches=6 and num_stages=4"),
    (lambda: gpipe(2, 2.5, 0), "num_microbatches must be a positive integer, got 2.5"),
    (lambda: simulate(build_all_schedules("gpipe", 2, 2), forward_time=0), "forward_time"),
    (lambda: simulate([[Action("forward", 0, 0)]]), "is not an Action with an ActionKind"),
])
def test_bad_configuration_gets_a_clear_error(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call()


# ---- zero bubble (Qi et al. 2023): B and W split, equal times T_F = T_B = T_W = 1 per stage -------

def zero_bubble_run(name, stages, microbatches, forward=1, input_gradient=1, weight=1):
    """Simulate with per-stage times (halved per chunk for ZB-V's two chunks), exact fractions."""
    chunks = 2 if name == "zbv" else 1
    forward, input_gradient, weight = (Fraction(t) / chunks for t in (forward, input_gradient, weight))
    return simulate(build_all_schedules(name, stages, microbatches), forward, input_gradient + weight,
                    weight_time=weight)


def idle_per_rank(result):
    return [result.makespan - compute for compute in result.compute_time]


def gap_inside_each_rank(result):
    """Idle time between a rank's first compute and its last: what a non-blocking optimizer step leaves."""
    gaps = []
    for rank, timeline in enumerate(result.timeline):
        computes = [interval for interval in timeline if interval.kind in COMPUTES]
        gaps.append(computes[-1].end - computes[0].start - result.compute_time[rank])
    return gaps


@pytest.mark.parametrize("stages", STAGE_COUNTS)
def test_zb_h1_idles_a_third_of_1f1b_with_1f1b_peak_memory(stages):
    for microbatches in range(stages, 17):
        result = zero_bubble_run("zb-h1", stages, microbatches)
        baseline = run("1f1b", stages, microbatches)  # forward 1, backward 2 = B + W
        assert idle_per_rank(result) == [stages - 1] * stages, microbatches  # (p-1)(T_F + T_B - T_W)
        assert idle_per_rank(baseline) == [3 * (stages - 1)] * stages  # (p-1)(T_F + T_B + T_W)
        assert result.bubble_fraction == Fraction(stages - 1, 3 * microbatches + stages - 1)
        assert result.peak_in_flight == [stages] * stages == [max(baseline.peak_in_flight)] * stages


@pytest.mark.parametrize("stages", STAGE_COUNTS)
def test_zb_h2_leaves_no_gap_inside_any_rank_with_2p_minus_1_in_flight(stages):
    for microbatches in range(2 * stages - 1, 17):  # its warm-up needs 2p - 1 micro-batches
        result = zero_bubble_run("zb-h2", stages, microbatches)
        assert gap_inside_each_rank(result) == [0] * stages, microbatches  # (p-1)(T_F + T_B - 2 T_W) = 0
        assert idle_per_rank(result) == [stages - 1] * stages  # only the start and end skew, (p-1) T_F
        assert result.peak_in_flight == [min(2 * stages - 1, microbatches)] * stages


ZBV_AT_ITS_BOUND = {1: range(1, 17), 2: range(2, 17), 3: range(3, 17), 4: range(4, 17), 8: (8, 11, 12, 14, 15, 16)}


@pytest.mark.parametrize("stages", sorted(ZBV_AT_ITS_BOUND))
def test_zbv_idles_only_half_a_stage_skew_with_1f1b_peak_memory(stages):
    for microbatches in ZBV_AT_ITS_BOUND[stages]:
        result = zero_bubble_run("zbv", stages, microbatches)
        assert idle_per_rank(result) == [Fraction(stages - 1, 2)] * stages, microbatches  # (p-1) T_F / 2
        # 2p chunk-activations, each half a stage: p stages' worth, 1F1B's stage 0 on every rank
        assert result.peak_in_flight == [2 * stages] * stages
        assert result.placement == (V_SHAPE if stages > 1 else "loop")  # one rank: both placements agree


def test_zbv_places_chunks_in_a_v_and_stays_within_two_forwards_of_its_bound_elsewhere():
    assert [chunks_of_stage(rank, 4, 2, V_SHAPE) for rank in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    for stages in range(1, 9):
        for microbatches in range(stages, 17):
            idle = idle_per_rank(zero_bubble_run("zbv", stages, microbatches))
            assert max(idle) <= Fraction(stages - 1, 2) + 2, (stages, microbatches, idle)


@pytest.mark.parametrize("times", [(1, 1, 1), (1, Fraction(3, 2), Fraction(1, 2)), (1, 2, 1), (2, 1, 1),
                                   (1, 1, Fraction(1, 2))])
def test_unequal_times_match_the_papers_formulas(times):
    """ZB-H1 idles (p-1)(T_F + T_B - T_W) per rank when that is the largest of the three bounds (else
    the wait for the first gradient, (p-1)T_B, or the start skew, (p-1)T_F); ZB-H2 leaves at most
    (p-1)(T_F + T_B - 2 T_W) inside a rank (stage 0; stage s (p-1-s)/(p-1) of it) and idles that or
    the skew (p-1) T_F per rank in one step, whichever is larger."""
    forward, input_gradient, weight = times
    for stages, microbatches in ((4, 8), (4, 16), (8, 16)):
        h1 = zero_bubble_run("zb-h1", stages, microbatches, *times)
        h2 = zero_bubble_run("zb-h2", stages, microbatches, *times)
        expected_h1 = (stages - 1) * max(forward + input_gradient - weight, forward, input_gradient)
        assert idle_per_rank(h1) == [expected_h1] * stages, (stages, microbatches)
        inside = (stages - 1) * max(0, forward + input_gradient - 2 * weight)
        assert gap_inside_each_rank(h2) == [inside * Fraction(stages - 1 - s, stages - 1) for s in range(stages)]
        assert idle_per_rank(h2) == [max(inside, (stages - 1) * forward)] * stages


def test_zero_bubble_rules_on_two_stages_exactly():
    def computes(schedule):
        return [(a.kind.name[0] + ("W" if a.kind == BACKWARD_WEIGHT else ""), a.microbatch)
                for a in schedule if a.kind in COMPUTES]

    h1 = build_all_schedules("zb-h1", 2, 3)  # stage 1 puts each W off by one B
    assert computes(h1[1]) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("BW", 0), ("F", 2), ("B", 2), ("BW", 1),
                               ("BW", 2)]
    h2 = build_all_schedules("zb-h2", 2, 4)  # stage 0 warms up with 2p - 1 = 3 forwards
    assert computes(h2[0])[:5] == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("BW", 0)]


def test_a_split_backward_must_be_whole_and_in_order():
    schedules = build_all_schedules("zb-h1", 2, 2)
    schedules[0].remove(Action(BACKWARD_WEIGHT, 1, 0))
    with pytest.raises(ScheduleError, match=r"BACKWARD_WEIGHT\(microbatch=1, chunk=0\) appears 0 times"):
        simulate(schedules)
    schedules = build_all_schedules("zb-h1", 2, 2)
    schedules[1].remove(Action(BACKWARD_WEIGHT, 0, 1))
    schedules[1].insert(0, Action(BACKWARD_WEIGHT, 0, 1))
    with pytest.raises(ScheduleError, match=r"BACKWARD_WEIGHT\(microbatch=0, chunk=1\) at position 0, "
                                            r"before its BACKWARD_INPUT"):
        simulate(schedules)


def test_zbv_message_tags_pair_up_including_the_turn_of_the_v_on_one_rank():
    stages, total_chunks = 3, 6
    schedules = build_all_schedules("zbv", stages, 4)
    sent, received = {}, {}
    for rank, schedule in enumerate(schedules):
        for action in schedule:
            if action.kind in SENDS:
                sent[message_tag(action, total_chunks)] = (rank, peer_rank(action, stages, V_SHAPE))
            elif action.kind in RECEIVES:
                received[message_tag(action, total_chunks)] = (peer_rank(action, stages, V_SHAPE), rank)
    assert sent == received
    assert sent[message_tag(Action(SEND_FORWARD, 0, 2), total_chunks)] == (2, 2)  # chunk 2 -> 3: both on rank 2
    assert len(sent) == 2 * 4 * (total_chunks - 1)


@pytest.mark.parametrize("call,needle", [
    (lambda: build_schedule("zbv", 2, 4, 0, 1), "'zbv' schedule holds 2 chunk"),
    (lambda: build_schedule("zb-h1", 2, 4, 0, 2), "'zb-h1' schedule holds 1 chunk"),
    (lambda: simulate(build_all_schedules("zb-h1", 2, 2), weight_time=2), "weight_time must be in"),
])
def test_bad_zero_bubble_configuration_gets_a_clear_error(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call()


def test_in_span_bubble_is_what_an_unsynchronised_step_end_would_leave():
    h2 = zero_bubble_run("zb-h2", 4, 8)
    assert h2.in_span_bubble_fraction == 0 and h2.bubble_fraction == Fraction(3, 27)
    h1 = zero_bubble_run("zb-h1", 4, 8)  # ZB-H1's ranks end together: its idle is inside the spans
    assert 0 < h1.in_span_bubble_fraction < h1.bubble_fraction
