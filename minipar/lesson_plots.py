"""Pictures for the lesson notebooks 04-07: what a layout splits, and what a run did.

Each function returns something a notebook cell can show and draws only what it is given;
the numbers in a picture come from the caller (a measured run, a Layout, a simulation).

    draw_column_row_split(tp)          the Megatron MLP: X·[A_1|...|A_t], then [B_1;...;B_t] and the sum
    gantt_image(events_per_rank, ...)  minipar.trace.plot_gantt's chart, as an image a cell displays
    draw_process_grid(layout)          the dp x tp x pp grid: which ranks form which group
    draw_memory_bars(reports, ...)     stacked bars of bytes per rank (parameters, gradients, states)

Nothing here is needed to train; only the notebooks import it (and matplotlib only when
a function is called).
"""
import tempfile
from pathlib import Path

from minipar.parallel.topology import Layout


def _rank_colours(count):
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10").colors
    return [palette[i % len(palette)] for i in range(count)]


def _matrix(axis, left, bottom, width, height, colours, split, label, label_below=""):
    """A matrix drawn as ``len(colours)`` blocks, side by side (split="columns") or stacked ("rows").

    Blocks are numbered from 0, as ranks are: block j is rank j's.
    """
    from matplotlib.patches import Rectangle

    count = len(colours)
    for index, colour in enumerate(colours):
        if split == "columns":
            box = (left + index * width / count, bottom, width / count, height)
        else:  # rows: block 0 on top, as a matrix is written
            box = (left, bottom + height - (index + 1) * height / count, width, height / count)
        axis.add_patch(Rectangle(box[:2], box[2], box[3], facecolor=colour, edgecolor="white", linewidth=1.5))
        if count > 1:
            axis.text(box[0] + box[2] / 2, box[1] + box[3] / 2, str(index), ha="center", va="center",
                      fontsize=8, color="white", fontweight="bold")
    axis.text(left + width / 2, bottom + height + 0.15, label, ha="center", va="bottom", fontsize=10)
    if label_below:
        axis.text(left + width / 2, bottom - 0.15, label_below, ha="center", va="top", fontsize=8)


def _symbol(axis, x, y, text, size=14):
    axis.text(x, y, text, ha="center", va="center", fontsize=size)


def draw_column_row_split(tp=4):
    """The tensor-parallel MLP of Shoeybi et al. (2019, section 3) on ``tp`` ranks, one colour per rank.

    Top: $Y = gelu(X A)$ with $A$ split by columns, so rank $j$ computes the columns $Y_j = gelu(X A_j)$
    alone (GELU acts elementwise, so no sum is needed before it). Bottom: $Z = Y B$ with $B$ split
    by rows, so rank $j$ computes the partial product $Y_j B_j$, already full size, and the
    allreduce (Megatron's g) adds them. Grey means "the same on every rank".
    """
    import matplotlib.pyplot as plt

    colours = _rank_colours(tp)
    grey = "#9e9e9e"
    batch, width, hidden = 1.2, 1.6, 6.4  # drawn sizes of b·s, h and 4h
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.4), gridspec_kw={"height_ratios": [1, 2.1]})
    for axis in (top, bottom):
        axis.set_axis_off()
        axis.set_aspect("equal")

    # Column split: X (b s, h) · A (h, 4h) = Y (b s, 4h).
    y0 = 0.4
    _matrix(top, 0, y0, width, batch, [grey], "columns", "X  (bs × h)", "same on every rank: f copies it")
    _symbol(top, width + 0.45, y0 + batch / 2, "·")
    _matrix(top, width + 0.9, y0 - 0.2, hidden, width, colours, "columns", "A = [A₀ | … | Aₜ₋₁]  (h × 4h)",
            "rank j holds the columns Aⱼ")
    _symbol(top, width + hidden + 1.35, y0 + batch / 2, "=")
    _matrix(top, width + hidden + 1.8, y0, hidden, batch, colours, "columns", "Y = [Y₀ | … | Yₜ₋₁]",
            "Yⱼ = GELU(X Aⱼ): local, no communication")
    top.set_xlim(-0.3, 2 * hidden + width + 2.2)
    top.set_ylim(-0.6, y0 + width + 0.6)
    top.set_title(f"column-parallel: split A by columns over t = {tp} ranks", fontsize=11)

    # Row split: Y (b s, 4h) · B (4h, h) = Σ_j Y_j B_j, then the allreduce.
    y0 = 2.6
    _matrix(bottom, 0, y0, hidden, batch, colours, "columns", "Y = [Y₀ | … | Yₜ₋₁]")
    _symbol(bottom, hidden + 0.45, y0 + batch / 2, "·")
    _matrix(bottom, hidden + 0.9, y0 + batch / 2 - hidden / 2, width, hidden, colours, "rows",
            "B = [B₀; …; Bₜ₋₁]  (4h × h)", "rank j holds the rows Bⱼ")
    _symbol(bottom, hidden + width + 1.35, y0 + batch / 2, "=")
    left = hidden + width + 1.8
    for index, colour in enumerate(colours):  # the t partial sums, each full size, fanned out
        offset = 0.18 * (tp - 1 - index)
        _matrix(bottom, left + offset, y0 - offset, width, batch, [colour], "columns", "")
    bottom.text(left + width / 2 + 0.09 * tp, y0 - 0.18 * tp - 0.1, "Yⱼ Bⱼ on rank j:\nfull size, partial",
                ha="center", va="top", fontsize=8)
    arrow_left = left + width + 0.18 * tp + 0.4
    bottom.annotate("", xy=(arrow_left + 1.6, y0 + batch / 2), xytext=(arrow_left, y0 + batch / 2),
                    arrowprops=dict(arrowstyle="->", lw=1.5))
    bottom.text(arrow_left + 0.8, y0 + batch / 2 - 0.25, "allreduce\n(g)", ha="center", va="top", fontsize=9)
    _matrix(bottom, arrow_left + 1.8, y0, width, batch, [grey], "columns", "Z = Σⱼ Yⱼ Bⱼ (+ bias once)",
            "same on every rank")
    bottom.set_xlim(-0.3, arrow_left + width + 2.4)
    bottom.set_ylim(y0 - hidden / 2 + batch / 2 - 0.8, y0 + batch / 2 + hidden / 2 + 0.6)
    bottom.set_title("row-parallel: split B by rows; the partial products are summed by one allreduce",
                     fontsize=11)
    figure.tight_layout()
    return figure


def gantt_image(events_per_rank, title="", time_unit="ms"):
    """``minipar.trace.plot_gantt``'s chart of ``events_per_rank`` as an IPython Image for a cell."""
    from IPython.display import Image

    from minipar.trace import plot_gantt

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "gantt.png"
        plot_gantt(path, events_per_rank, title, time_unit=time_unit)
        return Image(data=path.read_bytes(), format="png")


def draw_process_grid(layout):
    """The ranks of ``layout`` (a ``Layout``) as a grid, with their three kinds of group.

    Rows are pipeline stages; in each row a box per data-parallel replica holds that replica's
    tensor-parallel group (adjacent ranks). Dashed lines join the members of each data-parallel
    group (same tp and pp coordinates); arrows run down each pipeline group (same dp and tp).
    Every position and label is computed by ``layout.rank_of``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if not isinstance(layout, Layout):
        raise TypeError(f"draw_process_grid needs a minipar Layout, got {type(layout).__name__}")
    column_gap, replica_gap, row_gap = 1.0, 0.8, 1.6
    replica_width = layout.tp * column_gap
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 + 1.2 * layout.dp * layout.tp + 0.6 * layout.dp),
                                         1.6 + 1.15 * layout.pp))
    axis.set_axis_off()
    axis.set_aspect("equal")

    def centre(dp_rank, tp_rank, pp_rank):
        return dp_rank * (replica_width + replica_gap) + tp_rank * column_gap, -pp_rank * row_gap

    for pp_rank in range(layout.pp):
        axis.text(-0.9, -pp_rank * row_gap, f"stage {pp_rank}", ha="right", va="center", fontsize=9)
        for dp_rank in range(layout.dp):
            x, y = centre(dp_rank, 0, pp_rank)
            axis.add_patch(FancyBboxPatch((x - 0.4, y - 0.4), replica_width - 0.2, 0.8,
                                          boxstyle="round,pad=0.05", facecolor="#deebf7", edgecolor="#3182bd"))
            if pp_rank == 0:
                axis.text(x + replica_width / 2 - 0.5, y + 0.6, f"replica dp {dp_rank}", ha="center", fontsize=9)
            for tp_rank in range(layout.tp):
                cx, cy = centre(dp_rank, tp_rank, pp_rank)
                axis.add_patch(plt.Circle((cx, cy), 0.28, color="#08519c"))
                axis.text(cx, cy, str(layout.rank_of(dp_rank, tp_rank, pp_rank)), ha="center", va="center",
                          color="white", fontweight="bold", fontsize=10)
                if layout.dp > 1 and dp_rank < layout.dp - 1:  # to the same slot of the next replica
                    nx, ny = centre(dp_rank + 1, tp_rank, pp_rank)
                    axis.annotate("", xy=(nx, ny - 0.28), xytext=(cx, cy - 0.28),
                                  arrowprops=dict(arrowstyle="-", color="#e6550d", lw=1.2, linestyle="--",
                                                  connectionstyle="arc3,rad=0.25"))
                if pp_rank < layout.pp - 1:
                    nx, ny = centre(dp_rank, tp_rank, pp_rank + 1)
                    axis.annotate("", xy=(nx, ny + 0.3), xytext=(cx, cy - 0.3),
                                  arrowprops=dict(arrowstyle="->", color="#31a354", lw=1.2))
    right = centre(layout.dp - 1, layout.tp - 1, 0)[0]
    axis.set_xlim(-2.2, right + 0.8)
    axis.set_ylim(-(layout.pp - 1) * row_gap - 1.1, 1.0)
    axis.plot([], [], color="#3182bd", lw=6, alpha=0.4, label="tensor-parallel group (box)")
    axis.plot([], [], linestyle="--", color="#e6550d", label="data-parallel group")
    axis.plot([], [], color="#31a354", label="pipeline group (arrows)")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    axis.set_title(f"dp {layout.dp} × tp {layout.tp} × pp {layout.pp}: rank = tp_rank + tp·(dp_rank + dp·pp_rank)",
                   fontsize=10)
    figure.tight_layout()
    return figure


def draw_memory_bars(reports, title="", kinds=("parameters", "gradients", "optimizer_states"), formulas=None):
    """Stacked bars of bytes, one bar per entry of ``reports``.

    ``reports`` maps a label (a ZeRO stage, say) to a dict with a byte count per kind;
    ``formulas`` optionally maps the same labels to a predicted total, drawn as a black tick.
    """
    import matplotlib.pyplot as plt

    labels = list(reports)
    figure, axis = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 3.4))
    base = [0.0] * len(labels)
    for kind, colour in zip(kinds, ("#6baed6", "#fd8d3c", "#74c476", "#9e9ac8")):
        heights = [reports[label][kind] / 1024 for label in labels]
        axis.bar(range(len(labels)), heights, bottom=base, color=colour, label=kind.replace("_", " "))
        base = [b + h for b, h in zip(base, heights)]
    if formulas:
        axis.scatter([labels.index(label) for label in formulas], [formulas[label] / 1024 for label in formulas],
                     marker="_", s=900, color="black", linewidths=2, label="formula", zorder=3)
    axis.set_xticks(range(len(labels)), labels)
    axis.set_ylabel("KiB per rank")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    figure.tight_layout()
    return figure
