"""Per-rank timelines: record what each rank did and when, then look at it.

Each rank keeps a ``Timeline`` and records spans of work into it:

    timeline = Timeline(rank)
    with timeline.span("forward", category="forward", microbatch=3):
        output = stage(inputs)
    timeline.record("recv", "recv", start, end, microbatch=3)   # times from time.perf_counter()

Rank 0 then gathers every rank's events (a small pickled ``comm.gather`` is fine: this is
metadata) and writes them out:

- ``write_chrome_trace(path, events_per_rank)``: Chrome trace-event JSON, which Perfetto
  (ui.perfetto.dev) and chrome://tracing open; one process per rank.
- ``plot_gantt(path, events_per_rank, title)``: a PNG with one row per rank, a colour per
  category and the micro-batch number in each box wide enough to hold it.
- ``measured_bubble_fraction(events_per_rank)``: the share of rank-time not spent computing.

``events_per_rank`` is a list indexed by rank, or a dict from rank to events, where each rank's
events are a ``Timeline``, a list of ``TraceEvent``, or anything with the same attributes
(``category``, ``start``, ``end``, and optionally ``name`` and ``args``). The pipeline
simulator's intervals qualify (as does a whole ``SimulationResult``), so a schedule can be drawn
before it ever runs: ``plot_gantt("1f1b.png", simulate(schedules), "1F1B", time_unit="units")``.

``time.perf_counter`` reads the same monotonic clock in every process of one machine, so the
ranks' timelines line up there; across machines the clocks are unrelated.
Both writers are atomic: they write a temporary file beside the target and ``os.replace`` it,
so a reader never sees half a file.
"""
import json
import os
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

# What counts as useful work when measuring the bubble; everything else is overhead or waiting.
# The zero-bubble schedules split backward into B (backward_input) and W (backward_weight).
COMPUTE_CATEGORIES = ("forward", "backward", "backward_input", "backward_weight")

_COLOURS = {"forward": "#74a9cf", "backward": "#fdae6b", "backward_input": "#e6550d", "backward_weight": "#fdd0a2",
            "recv": "#d9d9d9", "send": "#74c476",
            "idle": "#efe4d2", "optimizer": "#9e9ac8", "allreduce": "#fb6a4a"}
_LEGEND_LABELS = {"backward_input": "B (input grad)", "backward_weight": "W (weight grad)"}  # zero bubble
_OTHER_COLOURS = ("#bcbd22", "#17becf", "#e377c2", "#8c564b", "#7f7f7f")
_TIME_UNITS = {"s": (1.0, "time (s)"), "ms": (1e3, "time (ms)"), "us": (1e6, "time (µs)"),
               "units": (1.0, "time (simulated units)")}


@dataclass(frozen=True)
class TraceEvent:
    """``category`` work named ``name`` from ``start`` to ``end`` seconds, with extra ``args``."""

    name: str
    category: str
    start: float
    end: float
    args: dict = field(default_factory=dict)


class Timeline:
    """One rank's recorded events, in the order they were recorded."""

    def __init__(self, rank=None):
        self.rank = rank
        self.events = []

    def record(self, name, category, start, end, **args):
        if end < start:
            raise ValueError(f"event {name!r} ends at {end} before it starts at {start}")
        self.events.append(TraceEvent(name, category, start, end, args))

    @contextmanager
    def span(self, name, category=None, **args):
        """Record the time spent inside the ``with`` block (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, category or name, start, time.perf_counter(), **args)

    def clear(self):
        self.events.clear()

    def __iter__(self):
        return iter(self.events)

    def __len__(self):
        return len(self.events)


def _as_event(event):
    if not (hasattr(event, "category") and hasattr(event, "start") and hasattr(event, "end")):
        raise ValueError(f"{event!r} is not a trace event: it needs category, start and end")
    if event.end < event.start:
        raise ValueError(f"event {event!r} ends before it starts")
    return TraceEvent(str(getattr(event, "name", event.category)), str(event.category),
                      event.start, event.end, dict(getattr(event, "args", None) or {}))


def _events_by_rank(events_per_rank):
    """{rank: [TraceEvent, ...]} from a list indexed by rank or a dict keyed by rank."""
    events_per_rank = getattr(events_per_rank, "timeline", events_per_rank)  # a SimulationResult
    if isinstance(events_per_rank, Mapping):
        items = events_per_rank.items()
    else:
        items = enumerate(events_per_rank)
    by_rank = {int(rank): [_as_event(event) for event in events] for rank, events in items}
    if not by_rank:
        raise ValueError("no ranks given: pass one list of events per rank")
    return by_rank


def _time_origin(by_rank):
    starts = [event.start for events in by_rank.values() for event in events]
    return min(starts) if starts else 0.0


def _write_atomically(path, write):
    """Call ``write(binary_file)`` on a temporary file, then move it onto ``path`` in one step."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it owner-only; a trace is for sharing
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _json_value(value):
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    return str(value)


def write_chrome_trace(path, events_per_rank):
    """Write Chrome trace-event JSON: one complete ("X") event per span, pid = tid = rank.

    Timestamps are microseconds after the earliest event of any rank. Each rank also gets
    "process_name" metadata reading "rank R" and a sort index, so Perfetto lists them in order.
    """
    by_rank = _events_by_rank(events_per_rank)
    origin = _time_origin(by_rank)
    trace_events = []
    for rank in sorted(by_rank):
        trace_events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": rank,
                             "args": {"name": f"rank {rank}"}})
        trace_events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": rank,
                             "args": {"sort_index": rank}})
        for event in by_rank[rank]:
            trace_events.append({"name": event.name, "cat": event.category, "ph": "X",
                                 "ts": float(event.start - origin) * 1e6,
                                 "dur": float(event.end - event.start) * 1e6,
                                 "pid": rank, "tid": rank, "args": event.args})
    document = {"traceEvents": trace_events, "displayTimeUnit": "ms"}
    text = json.dumps(document, default=_json_value)
    _write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def measured_bubble_fraction(events_per_rank):
    """1 - (compute time summed over ranks) / (number of ranks × span).

    The span runs from the earliest start to the latest end over all ranks; compute is every
    event whose category is in ``COMPUTE_CATEGORIES``. A rank's compute events must not overlap
    (a rank does one thing at a time), or they would be counted twice.
    """
    by_rank = _events_by_rank(events_per_rank)
    events = [event for rank_events in by_rank.values() for event in rank_events]
    if not events:
        raise ValueError("no events recorded on any rank: nothing to measure")
    span = max(event.end for event in events) - min(event.start for event in events)
    if span <= 0:
        raise ValueError("the events cover no time: nothing to measure")
    compute = sum(event.end - event.start for event in events
                  if event.category in COMPUTE_CATEGORIES)
    return 1 - compute / (len(by_rank) * span)


def _colour_for(category, palette):
    if category not in palette:
        palette[category] = _OTHER_COLOURS[(len(palette) - len(_COLOURS)) % len(_OTHER_COLOURS)]
    return palette[category]


def _lighten(colour, amount):
    from matplotlib.colors import to_rgb
    return tuple(channel + (1.0 - channel) * amount for channel in to_rgb(colour))


def plot_gantt(path, events_per_rank, title="", *, time_unit="ms"):
    """Draw a Gantt chart PNG: one row per rank (rank 0 on top), a colour per category.

    Forward and backward boxes (and the zero-bubble B and W, each its own colour) carry their
    micro-batch number when it fits; with several chunks
    per rank (interleaving) later chunks are drawn lighter. ``time_unit`` is "ms", "s" or "us"
    for measured seconds, or "units" for simulated times left as they are. Draws on
    matplotlib's Agg canvas directly, so it never touches pyplot's global backend.
    """
    if time_unit not in _TIME_UNITS:
        raise ValueError(f"time_unit must be one of {sorted(_TIME_UNITS)}, got {time_unit!r}")
    from matplotlib.patches import Patch  # here: matplotlib takes a second to import, traces need none

    by_rank = _events_by_rank(events_per_rank)
    scale, axis_label = _TIME_UNITS[time_unit]
    origin = _time_origin(by_rank)
    ranks = sorted(by_rank)
    end = max((float(event.end - origin) * scale for events in by_rank.values()
               for event in events), default=1.0) or 1.0
    chunks_of = {rank: sorted({event.args["chunk"] for event in by_rank[rank]
                               if "chunk" in event.args}) for rank in ranks}
    interleaved = any(len(chunks) > 1 for chunks in chunks_of.values())
    figure, axes = _gantt_axes(ranks, end, axis_label, title)

    palette = dict(_COLOURS)
    seen = []
    for row, rank in enumerate(ranks):
        _draw_rank_row(axes, row, by_rank[rank], chunks_of[rank], palette, seen,
                       lambda event: (float(event.start - origin) * scale, float(event.end - event.start) * scale))

    order = [c for c in _COLOURS if c in seen] + [c for c in seen if c not in _COLOURS]
    axes.legend(handles=[Patch(color=palette[c], label=_LEGEND_LABELS.get(c, c)) for c in order],
                title="lighter: later chunk" if interleaved else None,
                loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _write_atomically(path, lambda file: figure.savefig(file, format="png"))


def _gantt_axes(ranks, end, axis_label, title):
    """A figure on matplotlib's Agg canvas and its axes: a band per rank, rank 0 on top, time from 0 to end."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred as in plot_gantt
    from matplotlib.figure import Figure

    height = max(2.2, 1.1 + 0.55 * len(ranks))  # inches: a band per rank, title, axis, legend
    figure = Figure(figsize=(12, height), dpi=120)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.07, right=0.85, top=1 - 0.4 / height, bottom=0.6 / height)
    axes = figure.add_subplot()
    axes.set_xlim(0, end)
    axes.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    axes.set_yticks(range(len(ranks)), [f"rank {rank}" for rank in ranks])
    axes.set_xlabel(axis_label)
    axes.set_title(title)
    axes.grid(axis="x", color="#eeeeee", zorder=0)
    return figure, axes


def _draw_rank_row(axes, row, events, chunks, palette, seen, place):
    """One rank's boxes in band ``row``; ``place(event)`` gives (left, width) in axis units.

    Adds each new category to ``seen`` (for the legend) and labels compute boxes with their
    micro-batch where the text fits.
    """
    figure = axes.get_figure()
    # A label fits when the box is wider, in pixels, than the text at this font size.
    pixels_per_unit = axes.get_position().width * figure.get_figwidth() * figure.dpi / axes.get_xlim()[1]
    font_size = 7
    character_pixels = 0.62 * font_size * figure.dpi / 72
    boxes, colours = [], []
    for event in events:
        left, width = place(event)
        if width <= 0:
            continue  # a send takes no time on the sender's side
        colour = _colour_for(event.category, palette)
        if event.category not in seen:
            seen.append(event.category)
        is_compute = event.category in COMPUTE_CATEGORIES
        if is_compute and len(chunks) > 1 and "chunk" in event.args:
            depth = chunks.index(event.args["chunk"]) / (len(chunks) - 1)
            colour = _lighten(colour, 0.45 * depth)
        boxes.append((left, width))
        colours.append(colour)
        label = str(event.args.get("microbatch", ""))
        if is_compute and label and width * pixels_per_unit > len(label) * character_pixels + 3:
            axes.text(left + width / 2, row, label, ha="center", va="center", fontsize=font_size, zorder=3)
    # One collection per rank: drawing hundreds of separate bars is slow.
    axes.broken_barh(boxes, (row - 0.4, 0.8), facecolors=colours, edgecolor="white", linewidth=0.5, zorder=2)
