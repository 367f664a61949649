"""Pipeline bubble, measured: idle share of a real step against the formulas and the simulator.

    mpiexec -n 2 python benchmarks/bench_pipeline_bubble.py --out out/bubble
    mpiexec -n 8 python benchmarks/bench_pipeline_bubble.py --stages 2 4 8 --out out/bubble   # 8+ cores
    mpiexec -n 4 python benchmarks/bench_pipeline_bubble.py --stages 4 --microbatches 8 \
        --schedules 1f1b zb-h1 zb-h2 zbv --out out/zero_bubble                       # zero bubble, 4+ cores

Every stage gets the same work: the model is a stack of identical matmul-heavy layers,
x -> tanh(x W1) W2 with W1 (w, k·w) and W2 (k·w, w), ``--layers-per-stage`` of them per stage (split
into v chunks when interleaving), between a pass-through first piece and a cheap loss. Activations
between stages are only (b, w), so messages are small next to the compute.

For each (p, m, schedule) the first p ranks run ``--steps`` timed steps after one warm-up (ranks
start together after a barrier; the others wait without spinning). Each rank's ``Timeline`` holds
its forward and backward spans, and

    measured bubble = 1 - (compute time summed over ranks) / (p × step span)

(``minipar.trace.measured_bubble_fraction``); the table shows the step with the shortest span,
the one least disturbed by other load on the machine. It is compared with

    formula:   (p-1)/(m+p-1) of the step for GPipe and 1F1B (Huang et al. 2019; Narayanan et al.
               2021 write it (p-1)/m as a ratio to the ideal time), and for interleaving with v
               chunks ((p-1)/v) / (m + (p-1)/v), that is (1/v)(p-1)/m of the ideal time; for the
               zero-bubble schedules (Qi et al. 2023) with T_F = T_B = T_W = T, each rank computes
               3mT and idles (p-1)T under ZB-H1 (the paper's (p-1)(T_F+T_B-T_W)) and under ZB-H2 in
               one synchronous step (its start and end skew, (p-1)T_F; inside each rank it idles
               (p-1)(T_F+T_B-2T_W) = 0), and (p-1)T/2 under ZB-V (half-stage chunks), so
               (p-1)/(3m+p-1), (p-1)/(3m+p-1) and (p-1)/(6m+p-1) of the step;
    simulated: ``simulate`` on the same schedules with free messages and backward = 2 × forward
               (B = W = forward when split);
    replayed:  the same schedules replayed with this step's own measured compute durations and
               free messages: the bubble the compute alone explains. On a shared, busy machine the
               durations of identical work jitter, and jitter alone widens the bubble; measured −
               replayed is what messages, bookkeeping and waiting on descheduled peers add;
    in-span:   measured, but inside each rank's own span from its first compute to its last: what
               is left if the step's end need not wait for every rank (the zero-bubble paper's
               optimizer post-validation; docs/pipeline_schedules.md).

Rank 0 prints the table and writes, for every configuration, the Chrome trace JSON (open it in
ui.perfetto.dev) and a Gantt PNG into ``--out``. Timings only mean something with at least one
core per rank: more ranks than cores share cores, and the bubble then measures the sharing.
"""
import argparse
import os
import time

from minipar._threads import start_process  # noqa: E402

start_process()  # the CLI's process-wide settings first: BLAS threads, MPICH's wait, Ctrl-C (minipar/_threads.py)

from minipar.backend import from_host, host_rng, xp  # noqa: E402
from minipar.comm import Communicator  # noqa: E402
from minipar.nn.layers import Linear  # noqa: E402
from minipar.nn.module import Module  # noqa: E402
from minipar.parallel.pipeline.executor import PipelineExecutor, split_microbatches  # noqa: E402
from minipar.parallel.pipeline.partition import partition  # noqa: E402
from minipar.parallel.pipeline.schedules import RECEIVES, SENDS, build_all_schedules, placement_of  # noqa: E402
from minipar.parallel.pipeline.simulator import message_key, simulate  # noqa: E402
from minipar.trace import COMPUTE_CATEGORIES, Timeline, measured_bubble_fraction, plot_gantt, write_chrome_trace  # noqa: E402


class PassThrough(Module):
    """The first piece: the input already is an activation (b, w)."""

    def forward(self, x):
        return x


class BusyLayer(Module):
    """x -> tanh(x W1) W2: compute grows with k·w², the message between stages stays b·w."""

    def __init__(self, width, expansion, generator):
        self.expand = Linear(width, expansion * width, bias=False)
        self.contract = Linear(expansion * width, width, bias=False)
        for linear in (self.expand, self.contract):
            fan_in = linear.weight.shape[0]
            linear.weight.data[...] = from_host(generator.normal(0, fan_in**-0.5, linear.weight.shape))

    def forward(self, x):
        return self.contract(self.expand(x).tanh())


class MeanSquare(Module):
    """The last piece: a loss that costs next to nothing (targets unused)."""

    def forward(self, x, targets):
        return (x * x).mean()


def formula_bubble(schedule, stages, microbatches, chunks_per_stage):
    """Bubble as a fraction of the step: ((p-1)/v) / (m + (p-1)/v) (v = 1: GPipe's (p-1)/(m+p-1));
    for the zero-bubble schedules, idle / (3m + idle) in units of T = T_F = T_B = T_W."""
    idle = {"zb-h1": stages - 1, "zb-h2": stages - 1, "zbv": (stages - 1) / 2}.get(schedule)
    if idle is not None:
        return idle / (3 * microbatches + idle)
    fill = (stages - 1) / chunks_per_stage
    return fill / (microbatches + fill)


def simulated_bubble(schedule, stages, microbatches, chunks_per_stage):
    schedules = build_all_schedules(schedule, stages, microbatches, chunks_per_stage)
    return simulate(schedules, forward_time=1 / chunks_per_stage, backward_time=2 / chunks_per_stage,
                    weight_time=1 / chunks_per_stage).bubble_fraction


def replayed_bubble(schedules, events_per_rank):
    """The bubble of the schedules with each compute taking its measured time and free messages."""
    durations = {(event.category, event.args["microbatch"], event.args["chunk"]): event.end - event.start
                 for events in events_per_rank for event in events if event.category in COMPUTE_CATEGORIES}
    stages = len(schedules)
    clock, position, arrival, progress = [0.0] * stages, [0] * stages, {}, True
    while progress:  # run each rank until it waits on a message not yet sent, round after round
        progress = False
        for rank, schedule in enumerate(schedules):
            while position[rank] < len(schedule):
                action = schedule[position[rank]]
                if action.kind in RECEIVES:
                    if message_key(action) not in arrival:
                        break
                    clock[rank] = max(clock[rank], arrival[message_key(action)])
                elif action.kind in SENDS:
                    arrival[message_key(action)] = clock[rank]
                else:
                    clock[rank] += durations[(str(action.kind), action.microbatch, action.chunk)]
                position[rank] += 1
                progress = True
    return 1 - sum(durations.values()) / (stages * max(clock))


def in_span_bubble(events_per_rank):
    """Idle share inside each rank's own span (first compute to last): what a step whose end does not
    wait for every rank would leave (the zero-bubble paper's optimizer post-validation)."""
    compute = span = 0.0
    for events in events_per_rank:
        computes = [event for event in events if event.category in COMPUTE_CATEGORIES]
        compute += sum(event.end - event.start for event in computes)
        span += max(event.end for event in computes) - min(event.start for event in computes)
    return 1 - compute / span


def wait_without_spinning(world):
    """A barrier that sleeps between polls, so ranks sitting out a configuration leave the cores free."""
    request = world.mpi.Ibarrier()
    while not request.Test():
        time.sleep(0.002)


def run_configuration(stage_comm, arguments, schedule, microbatches, chunks_per_stage):
    """Timed steps of one configuration; returns (bubble, span, events per rank) on rank 0."""
    stages = stage_comm.size
    layers = stages * arguments.layers_per_stage
    generator = host_rng(0)
    pieces = [PassThrough()] + [BusyLayer(arguments.width, arguments.expansion, generator) for _ in range(layers)]
    pieces.append(MeanSquare())
    chunks = partition(pieces, stages, stage_comm.rank, chunks_per_stage, placement=placement_of(schedule))
    timeline = Timeline(stage_comm.rank)
    micro_rows = arguments.microbatch_size
    executor = PipelineExecutor(chunks, stage_comm, schedule, microbatches, (micro_rows, arguments.width),
                                xp.float32, timeline=timeline)
    batch = from_host(host_rng(1).normal(size=(micro_rows * microbatches, arguments.width)).astype("float32"))
    micro_inputs = split_microbatches(batch, microbatches)
    best = None
    for step in range(1 + arguments.steps):  # step 0 warms up caches, allocators and MPI connections
        for chunk in chunks:
            chunk.zero_grad()
        timeline.clear()
        stage_comm.barrier()
        executor.run(micro_inputs, [None] * microbatches)
        events = stage_comm.mpi.gather(list(timeline.events), root=0)  # small metadata, pickled
        if stage_comm.rank == 0 and step > 0:
            span = max(e.end for rank in events for e in rank) - min(e.start for rank in events for e in rank)
            if best is None or span < best[1]:
                best = (measured_bubble_fraction(events), span, events)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the traces, Gantt charts and table")
    parser.add_argument("--stages", type=int, nargs="+", help="pipeline sizes p (default: the world size)")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zbv"])
    parser.add_argument("--chunks", type=int, default=2, help="v, chunks per stage for 'interleaved'")
    parser.add_argument("--layers-per-stage", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=64)
    parser.add_argument("--microbatch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (best is kept)")
    arguments = parser.parse_args()
    world = Communicator()
    stage_counts = arguments.stages or [world.size]
    if max(stage_counts) > world.size:
        raise SystemExit(f"--stages {max(stage_counts)} needs at least that many ranks; launched {world.size}")
    if arguments.layers_per_stage % arguments.chunks:
        raise SystemExit(f"--layers-per-stage {arguments.layers_per_stage} must split into {arguments.chunks} chunks")
    if world.rank == 0:
        os.makedirs(arguments.out, exist_ok=True)
        cores = os.cpu_count()
        print(f"pipeline bubble: {arguments.layers_per_stage} layers of tanh(x W1) W2 per stage, "
              f"w={arguments.width}, k={arguments.expansion}, b={arguments.microbatch_size}, float32; "
              f"{world.size} ranks on {cores} cores" + ("  (MORE RANKS THAN CORES: timings meaningless)"
                                                       if world.size > cores else ""))
        print("bubble = share of p x step time not spent in forward/backward; best of "
              f"{arguments.steps} steps\n")
        print(f"{'p':>3} {'m':>4} {'schedule':>12} {'v':>2} {'formula':>8} {'simulated':>10} "
              f"{'measured':>9} {'diff (pp)':>10} {'replayed':>9} {'in-span':>8} {'step ms':>8}")
    table = []
    for stages in stage_counts:
        stage_comm = world.split(color=0 if world.rank < stages else 1, key=world.rank)
        for schedule in arguments.schedules:
            chunks_per_stage = arguments.chunks if schedule == "interleaved" else 2 if schedule == "zbv" else 1
            for microbatches in arguments.microbatches:
                if schedule == "interleaved" and microbatches % stages:
                    continue  # the interleaved schedule runs micro-batches in groups of p
                result = None
                if world.rank < stages:
                    result = run_configuration(stage_comm, arguments, schedule, microbatches, chunks_per_stage)
                wait_without_spinning(world)
                if world.rank != 0:
                    continue
                measured, span, events = result
                formula = formula_bubble(schedule, stages, microbatches, chunks_per_stage)
                simulated = simulated_bubble(schedule, stages, microbatches, chunks_per_stage)
                replayed = replayed_bubble(build_all_schedules(schedule, stages, microbatches, chunks_per_stage),
                                           events)
                row = (stages, microbatches, schedule, chunks_per_stage, formula, simulated, measured,
                       100 * (measured - formula), replayed, in_span_bubble(events), 1e3 * span)
                table.append(row)
                print("{:>3} {:>4} {:>12} {:>2} {:>8.3f} {:>10.3f} {:>9.3f} {:>+10.1f} {:>9.3f} {:>8.3f} {:>8.1f}".format(
                    *row), flush=True)
                name = f"{schedule}_p{stages}_m{microbatches}"
                write_chrome_trace(os.path.join(arguments.out, f"{name}.json"), events)
                plot_gantt(os.path.join(arguments.out, f"{name}.png"), events,
                           f"{schedule}, p={stages}, m={microbatches}, v={chunks_per_stage}: measured bubble "
                           f"{measured:.3f}, formula {formula:.3f}")
    if world.rank == 0:
        with open(os.path.join(arguments.out, "bubble_table.csv"), "w") as file:
            file.write("p,m,schedule,v,formula,simulated,measured,diff_percentage_points,replayed,in_span,step_ms\n")
            for row in table:
                file.write(",".join(f"{value:.4f}" if isinstance(value, float) else str(value) for value in row) + "\n")
        print(f"\ntraces (*.json, open in ui.perfetto.dev), Gantt charts (*.png) and bubble_table.csv "
              f"in {arguments.out}")
    world.mpi.Barrier()


if __name__ == "__main__":
    from minipar.backend import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: freed activation blocks stay in the heap for reuse
    main()
