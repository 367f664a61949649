"""Timelines, Chrome trace JSON, Gantt PNGs and the measured bubble."""
import json
import os
from fractions import Fraction

import pytest

import minipar.trace as trace
from minipar.parallel.pipeline.schedules import build_all_schedules
from minipar.parallel.pipeline.simulator import simulate
from minipar.trace import Timeline, TraceEvent, measured_bubble_fraction, plot_gantt, write_chrome_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_rank_events():
    """Rank 0: forward 0-2, wait 2-3, backward 3-5. Rank 1: forward 1-2, backward 2-6.

    Span 0-6 on 2 ranks = 12 rank-seconds, of which 4 + 5 = 9 compute: the bubble is 1/4.
    Times are offset by 100 s, as perf_counter readings would be.
    """
    rank0, rank1 = Timeline(0), Timeline(1)
    rank0.record("F0", "forward", 100.0, 102.0, microbatch=0)
    rank0.record("recv", "recv", 102.0, 103.0, microbatch=0)
    rank0.record("B0", "backward", 103.0, 105.0, microbatch=0)
    rank1.record("F0", "forward", 101.0, 102.0, microbatch=0)
    rank1.record("B0", "backward", 102.0, 106.0, microbatch=0)
    return [rank0, rank1]


def test_measured_bubble_of_a_hand_made_timeline():
    assert measured_bubble_fraction(two_rank_events()) == 0.25


def test_measured_bubble_counts_ranks_that_recorded_nothing():
    rank0 = Timeline(0)
    rank0.record("F0", "forward", 0.0, 1.0)
    # Two ranks over one second, one second of compute: half the rank-time is bubble.
    assert measured_bubble_fraction({0: rank0, 1: Timeline(1)}) == 0.5


def test_measured_bubble_agrees_with_the_simulator():
    result = simulate(build_all_schedules("1f1b", 4, 6), Fraction(1), Fraction(2), Fraction(0))
    assert measured_bubble_fraction(result.timeline) == result.bubble_fraction == Fraction(3, 9)
    assert measured_bubble_fraction(result) == result.bubble_fraction


def test_measured_bubble_rejects_empty_input():
    with pytest.raises(ValueError, match="no events"):
        measured_bubble_fraction([Timeline(0), Timeline(1)])
    with pytest.raises(ValueError, match="no ranks"):
        measured_bubble_fraction([])


def test_span_records_its_block_with_perf_counter_times(monkeypatch):
    readings = iter([10.0, 10.25, 20.0, 20.5])
    monkeypatch.setattr(trace.time, "perf_counter", lambda: next(readings))
    timeline = Timeline(rank=3)
    with timeline.span("forward", category="forward", microbatch=3):
        pass
    with pytest.raises(RuntimeError):
        with timeline.span("backward", microbatch=4):
            raise RuntimeError("boom")
    assert timeline.events == [
        TraceEvent("forward", "forward", 10.0, 10.25, {"microbatch": 3}),
        TraceEvent("backward", "backward", 20.0, 20.5, {"microbatch": 4})]


def test_record_rejects_an_event_that_ends_before_it_starts():
    with pytest.raises(ValueError, match="ends at 1.0 before it starts at 2.0"):
        Timeline(0).record("F0", "forward", 2.0, 1.0)


def test_chrome_trace_is_valid_json_with_ranks_as_processes(tmp_path):
    path = tmp_path / "trace.json"
    write_chrome_trace(path, two_rank_events())
    document = json.loads(path.read_text())
    spans = [event for event in document["traceEvents"] if event["ph"] == "X"]
    names = {event["pid"]: event["args"]["name"] for event in document["traceEvents"]
             if event["ph"] == "M" and event["name"] == "process_name"}
    assert names == {0: "rank 0", 1: "rank 1"}
    assert [event["pid"] for event in spans] == [0, 0, 0, 1, 1]
    assert all(event["pid"] == event["tid"] for event in spans)
    # Microseconds after the earliest event (rank 0's forward at 100 s).
    assert [(event["cat"], event["ts"], event["dur"]) for event in spans] == [
        ("forward", 0.0, 2e6), ("recv", 2e6, 1e6), ("backward", 3e6, 2e6),
        ("forward", 1e6, 1e6), ("backward", 2e6, 4e6)]
    assert spans[0]["args"] == {"microbatch": 0}
    assert sorted(os.listdir(tmp_path)) == ["trace.json"]  # no temporary file left behind


def test_chrome_trace_of_a_simulated_schedule(tmp_path):
    result = simulate(build_all_schedules("interleaved", 2, 4, 2))
    path = tmp_path / "simulated.json"
    write_chrome_trace(path, result.timeline)
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == sum(len(intervals) for intervals in result.timeline)
    assert {e["pid"] for e in spans} == {0, 1}
    computes = [e for e in spans if e["cat"] in ("forward", "backward")]
    assert len(computes) == 2 * 4 * 4  # forward and backward of 4 micro-batches on 4 chunks
    assert max(e["ts"] + e["dur"] for e in spans) == result.makespan * 1e6


def test_rewriting_replaces_the_file_and_a_failed_write_keeps_the_old_one(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text("old")
    write_chrome_trace(path, two_rank_events())
    assert json.loads(path.read_text())["traceEvents"]

    def failing_write(file):
        file.write(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        trace._write_atomically(path, failing_write)
    assert json.loads(path.read_text())["traceEvents"]
    assert sorted(os.listdir(tmp_path)) == ["trace.json"]


def test_gantt_png_of_measured_and_simulated_timelines(tmp_path):
    measured = tmp_path / "measured.png"
    plot_gantt(measured, two_rank_events(), "two ranks")
    simulated = tmp_path / "interleaved.png"
    result = simulate(build_all_schedules("interleaved", 2, 4, 2), 0.5, 1.0)
    plot_gantt(simulated, result.timeline, "interleaved 1F1B, p=2, v=2, m=4", time_unit="units")
    for path in (measured, simulated):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000
    assert sorted(os.listdir(tmp_path)) == ["interleaved.png", "measured.png"]


def test_gantt_rejects_an_unknown_time_unit(tmp_path):
    with pytest.raises(ValueError, match="time_unit must be one of"):
        plot_gantt(tmp_path / "x.png", two_rank_events(), time_unit="minutes")
    assert not (tmp_path / "x.png").exists()


def test_events_must_look_like_events(tmp_path):
    with pytest.raises(ValueError, match="needs category, start and end"):
        write_chrome_trace(tmp_path / "bad.json", [[("forward", 0.0, 1.0)]])


def test_zero_bubble_b_and_w_are_compute_with_their_own_colours(tmp_path):
    result = simulate(build_all_schedules("zb-h1", 4, 8), Fraction(1), Fraction(2), weight_time=Fraction(1))
    assert measured_bubble_fraction(result) == result.bubble_fraction == Fraction(3, 27)
    colours = {category: trace._COLOURS[category] for category in ("forward", "backward_input", "backward_weight")}
    assert len(set(colours.values())) == 3, colours
    plot_gantt(tmp_path / "zb-h1.png", result, "ZB-H1", time_unit="units")
    assert (tmp_path / "zb-h1.png").read_bytes().startswith(PNG_MAGIC)
