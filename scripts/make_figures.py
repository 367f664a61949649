"""Draw the documentation's deterministic figures into docs/images/ (no MPI, a few seconds).

    python scripts/make_figures.py

* ``process_grid_2x2x2.png``: the 8 ranks of ``--dp 2 --tp 2 --pp 2`` and their three kinds of group
  (``minipar.lesson_plots.draw_process_grid``, the picture lesson 6 draws);
* ``simulated_{gpipe,1f1b,interleaved}_p4_m8.png``: one step of each schedule on 4 stages with
  8 micro-batches (interleaved: 2 chunks per rank), simulated with forward = 1, backward = 2 and free
  messages (``minipar.parallel.pipeline.simulator.simulate``, drawn by ``minipar.trace.plot_gantt``).

The measured chart ``1f1b_p2_m8.png`` comes from a timed run instead:
``mpiexec -n 2 python benchmarks/bench_pipeline_bubble.py --out out/bubble`` writes
``out/bubble/1f1b_p2_m8.png``; copy it to ``docs/images/``.
"""
from fractions import Fraction
from pathlib import Path

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def main():
    import matplotlib

    matplotlib.use("Agg")
    from minipar.lesson_plots import draw_process_grid
    from minipar.parallel.pipeline.schedules import build_all_schedules
    from minipar.parallel.pipeline.simulator import simulate
    from minipar.parallel.topology import Layout
    from minipar.trace import plot_gantt

    IMAGES.mkdir(parents=True, exist_ok=True)
    figure = draw_process_grid(Layout(2, 2, 2))
    figure.savefig(IMAGES / "process_grid_2x2x2.png", dpi=110, bbox_inches="tight")
    written = ["process_grid_2x2x2.png"]
    p, m = 4, 8
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        result = simulate(build_all_schedules(name, p, m, num_chunks=v), forward_time=Fraction(1, v),
                          backward_time=Fraction(2, v), send_time=Fraction(0))
        title = (f"{name}, p={p}, m={m}" + (f", v={v}" if v > 1 else "")
                 + f": simulated bubble {float(result.bubble_fraction):.3f} of the step")
        path = IMAGES / f"simulated_{name}_p{p}_m{m}.png"
        plot_gantt(path, result.timeline, title, time_unit="units")
        written.append(path.name)
    print("wrote", ", ".join(f"docs/images/{name}" for name in written))


if __name__ == "__main__":
    main()
