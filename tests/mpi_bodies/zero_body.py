"""Body of tests/test_zero.py: ZeRO's memory and traffic per rank against the formulas, ZeRO
with dp = 1, and the checkpoint arrays of every stage.

Byte counts, with Ψ this rank's parameter count (its tensor- and pipeline-parallel share), N
the dp size, n a parameter's size, Ψ' = Σ N ceil(n / N) the count padded to whole parts, and
4-byte floats (minipar's fp32 AdamW: parameters 4Ψ, gradients 4Ψ, m and v 8Ψ):

    DP        parameters 4Ψ     gradients 4Ψ           AdamW 8Ψ       = 16Ψ   (+ 4Ψ of buckets)
    P_os      parameters 4Ψ'    full gradients 4Ψ      AdamW 8Ψ'/N    = 8Ψ + 8Ψ/N
    P_os+g    parameters 4Ψ'    gradients 4Ψ'/N        AdamW 8Ψ'/N    = 4Ψ + 12Ψ/N
    P_os+g+p  parameters 4Ψ'/N  gradients 4Ψ'/N        AdamW 8Ψ'/N    = 16Ψ/N
"""
import weakref
from contextlib import contextmanager

import numpy as np

from minipar.backend import set_default_dtype, xp
from minipar.comm import Communicator
from minipar.comm.collectives import modelled_traffic
from minipar.errors import CheckpointError
from minipar.nn.gpt import GPTConfig
from minipar.train import TrainConfig, Trainer
from tests.mpi_bodies.equivalence_body import MODEL, batches
from tests.mpi_bodies.reporting import report

PADDED = dict(vocab_size=15, block_size=6, n_layer=2, n_head=3, n_embd=15)  # sizes 4 does not divide
TIED = "embedding.token.weight"


def train(world, model, steps, dtype="float32", **options):
    """A Trainer after ``steps`` steps; the dp counters hold the last step only."""
    model_config = GPTConfig(**model)
    config = TrainConfig(steps=10, batch_size=8, dtype=dtype, warmup_steps=1, weight_decay=0.1, **options)
    trainer = Trainer(model_config, config, world)
    losses = []
    for inputs, targets in batches(config, model_config, steps):
        trainer.grid.dp.reset_counters()
        losses.append(trainer.train_step(inputs, targets))
    return trainer, losses


def check_memory_and_traffic(comm):
    """Reports, per layout, (what, got, relation, expected) for pytest: the bytes of every stage
    against the formulas above, the traffic per step, and the peaks during the step."""
    set_default_dtype(xp.float32)
    world = Communicator(comm)
    # (dp 4, pp 1): padded parts, and the tied embedding in two pieces of one rank;
    # (dp 2, pp 2): no padding, every parameter in one piece: the exact DP volume and 1.5x.
    labels, checks = [], []
    for layout, model in ((dict(dp=4), dict(PADDED, n_layer=4)), (dict(dp=2, pp=2), MODEL)):
        layout_checks, bulk = [], {}  # bulk: stage -> bytes this rank sent in the step's gradient/parameter traffic
        for stage in (0, 1, 2, 3):
            trainer, _ = train(world, model, 2, **layout, zero=stage)
            layout_checks += memory_and_traffic_checks(trainer, stage, layout, bulk)
        padded_nowhere = all(expected for what, _, _, expected in layout_checks if what == "no padding")
        if padded_nowhere:
            layout_checks += [("stages 1 and 2 send what DP sends", [bulk[1], bulk[2]], "==", [bulk[0], bulk[0]]),
                              ("stage 3 sends 1.5 times DP", 2 * bulk[3], "==", 3 * bulk[0])]
        labels.append(str(layout))
        checks += [(f"{layout} {what}", *rest) for what, *rest in layout_checks if what != "no padding"]
    return report(labels, checks)


def memory_and_traffic_checks(trainer, stage, layout, bulk):
    count, rank = trainer.grid.dp.size, trainer.grid.dp_rank
    counters, measured = trainer.grid.dp.counters_snapshot(), trainer.memory_report()
    sizes = {name: array.size for name, array in trainer.parameter_arrays().items()}
    psi = sum(sizes.values())
    padded = sum(count * -(-n // count) for n in sizes.values())
    tied_twice = layout.get("pp", 1) == 1  # the embedding and the head share the weight on this rank
    tied_padded = count * -(-sizes[TIED] // count) if tied_twice else 0
    pieces = [[sizes[p.shard.full_name] for p in piece.parameters()] for chunk in trainer.chunks
              for piece in chunk.pieces]
    largest_piece, second_piece = sorted(sum(piece) for piece in pieces)[-1:-3:-1]
    largest_padded_piece = max(sum(count * -(-n // count) for n in piece) for piece in pieces)
    name = f"stage {stage}"
    checks = [("no padding", None, None, padded == psi)]
    if stage == 0:
        expected = dict(parameters=4 * psi, gradients=4 * psi, optimizer_states=8 * psi, data_parallel_buckets=4 * psi)
        scalar = modelled_traffic("allreduce", rank, count, 1, 8).bytes_sent  # the shared loss
        bulk[0] = counters["allreduce"]["bytes_sent"] - scalar
        if padded == psi:  # otherwise the ring's blocks, and the bytes, differ from rank to rank
            checks.append((f"{name} allreduce bytes", bulk[0], "==", 2 * (count - 1) * 4 * psi // count))
    else:
        expected = dict(parameters=4 * padded // (count if stage == 3 else 1),
                        gradients=4 * padded // count, optimizer_states=8 * padded // count)
        reduce_scatter, all_gather = (counters[key]["bytes_sent"] for key in ("reduce_scatter", "allgather"))
        # Stage 3 gathers before the forward and again in the backward, and the tied
        # weight (pp = 1) once for each of its two pieces.
        gathered = padded if stage < 3 else 2 * (padded + tied_padded)
        checks += [(f"{name} reduce-scatter bytes", reduce_scatter, "==", (count - 1) * 4 * padded // count),
                   (f"{name} all-gather bytes", all_gather, "==", (count - 1) * 4 * gathered // count)]
        bulk[stage] = reduce_scatter + all_gather
    checks += [(f"{name} memory", {key: measured[key] for key in expected}, "==", expected),
               (f"{name} total", measured["total"], "==",
                sum(measured[key] for key in ("parameters", "gradients", "optimizer_states")))]
    if stage == 1:  # every full gradient exists at once at the end of backward, as the paper counts
        checks.append((f"{name} peak full gradients", measured["peak_full_gradients"], "==", 4 * psi))
    if stage >= 2:  # a full gradient lives until its unit is complete: about one piece at a time
        checks += [(f"{name} peak full gradients", measured["peak_full_gradients"], "<=",
                    4 * (largest_piece + second_piece)),
                   (f"{name} peak full gradients, against half of all", measured["peak_full_gradients"], "<", 2 * psi)]
    if stage == 3:  # one piece's gathered parameters, plus the all-gather buffer they are cut from
        checks += [(f"{name} peak gathered parameters", measured["peak_gathered_parameters"], ">=", 4 * largest_piece),
                   (f"{name} peak gathered parameters", measured["peak_gathered_parameters"], "<=",
                    8 * largest_padded_piece)]
    paper = {0: 16 * psi, 1: 8 * psi + 8 * psi / count, 2: 4 * psi + 12 * psi / count, 3: 16 * psi / count}
    # Stage 1 keeps gradients whole, as the paper counts them, until the reduce-scatter.
    held = measured["total"] + (measured["peak_full_gradients"] - measured["gradients"] if stage == 1 else 0)
    if padded == psi:
        checks.append((f"{name} bytes held against the zero.py formula", held, "==", paper[stage]))
    return checks


def check_gradient_memory_with_micro_batches(comm):
    """Stages 2-3 reduce-scatter after every micro-batch (as DeepSpeed does), so with m = 4
    micro-batches a rank keeps 4Ψ'/N bytes of gradients, to the byte, and its full-size
    gradients never exceed what one micro-batch's backward holds (the same peak as m = 1),
    far below the 4Ψ that keeping them until the last micro-batch would cost. The price is
    traffic: m reduce-scatters per step. With --overlap at most two units' send buffers
    (full-size, padded) are in flight on top of that."""
    set_default_dtype(xp.float32)
    world = Communicator(comm)
    checks = []
    for stage in (2, 3):
        runs = {}
        for m, overlap in ((1, False), (4, False), (4, True)):
            trainer, _ = train(world, MODEL, 2, dp=world.size, zero=stage, microbatches=m, overlap=overlap)
            runs[m, overlap] = trainer, trainer.memory_report(), trainer.grid.dp.counters_snapshot()
        # No copy out: every part's .grad is a slice of its unit's one reduce-scatter output.
        views = [run.sync.parts[id(p)].grad.base is unit.gradient for run, _, _ in runs.values()
                 for unit in run.sync.units for p in unit.parameters]
        checks.append((f"stage {stage}: parts' gradients that view their unit's reduce-scatter output",
                       sum(views), "==", len(views)))
        trainer, measured, counters = runs[4, False]
        count = trainer.grid.dp.size
        sizes = [array.size for array in trainer.parameter_arrays().values()]
        psi, padded = sum(sizes), sum(count * -(-n // count) for n in sizes)
        pieces = sorted(sum(p.size for p in piece.parameters()) for chunk in trainer.chunks for piece in chunk.pieces)
        largest_padded_unit = max(sum(count * -(-p.size // count) for p in unit.parameters)
                                  for unit in trainer.sync.units)
        name = f"stage {stage}, 4 micro-batches"
        kept = 4 * padded // count
        checks += [
            (f"{name}: gradients kept (4Ψ'/N)", measured["gradients"], "==", kept),
            (f"{name}: bytes held", measured["total"], "==",
             4 * padded // (count if stage == 3 else 1) + kept + 8 * padded // count),
            (f"{name}: peak full gradients, as with 1 micro-batch", measured["peak_full_gradients"], "==",
             runs[1, False][1]["peak_full_gradients"]),
            (f"{name}: peak full gradients, at most two pieces'", measured["peak_full_gradients"], "<=",
             4 * (pieces[-1] + pieces[-2])),
            (f"{name}: peak full gradients, against a quarter of all", 4 * measured["peak_full_gradients"], "<",
             4 * psi),
            (f"{name}: reduce-scatter bytes, one per micro-batch", counters["reduce_scatter"]["bytes_sent"], "==",
             4 * (count - 1) * 4 * padded // count)]
        trainer, overlapped, counters = runs[4, True]
        checks += [
            (f"{name}, overlap: gradients kept", overlapped["gradients"], "==", kept),
            (f"{name}, overlap: peak full gradients, at most the blocking one plus two send buffers",
             overlapped["peak_full_gradients"], "<=", measured["peak_full_gradients"] + 2 * 4 * largest_padded_unit),
            (f"{name}, overlap: reduce-scatter bytes", counters["ireduce_scatter"]["bytes_sent"], "==",
             4 * (count - 1) * 4 * padded // count)]
        if stage == 3:  # the same all-gathers, most of them started one piece ahead
            blocking = runs[4, False][2]["allgather"]
            gathers = {key: counters[key] for key in ("allgather", "iallgather") if key in counters}
            checks += [
                (f"{name}, overlap: all-gather bytes, blocking and prefetched",
                 sum(record["bytes_sent"] for record in gathers.values()), "==", blocking["bytes_sent"]),
                (f"{name}, overlap: all-gathers prefetched, of {blocking['calls']}",
                 gathers["iallgather"]["calls"], ">=", blocking["calls"] // 2),
                (f"{name}, overlap: peak gathered parameters, at most one piece more",
                 overlapped["peak_gathered_parameters"], "<=",
                 measured["peak_gathered_parameters"] + 2 * 4 * largest_padded_unit)]
    return report(["micro-batches"], checks)


def check_stage_3_frees_gathered_parameters(comm):
    """Stage 3: a piece's gathered parameters are gone by the time the next piece gathers its own
    (forward or backward, any micro-batch), so no graph or stash keeps one alive."""
    set_default_dtype(xp.float32)
    world = Communicator(comm)
    model_config = GPTConfig(**PADDED)
    config = TrainConfig(steps=10, batch_size=8, dp=world.size, zero=3, microbatches=2)
    trainer = Trainer(model_config, config, world)
    zero, earlier, entered, alive_at_gather = trainer.sync, [], [0], []
    gathered = zero.gathered

    @contextmanager
    def watched(units, prefetch=()):
        alive_at_gather.append(sum(reference() is not None for reference in earlier))
        with gathered(units, prefetch):
            entered[0] += 1
            earlier.extend(weakref.ref(p.data.base) for unit in units for p in unit.parameters)
            yield

    zero.gathered = watched
    for inputs, targets in batches(config, model_config, 2):
        trainer.train_step(inputs, targets)
    # Between uses a parameter keeps its shape but holds one number (a NaN stand-in), not its part.
    shapes = {name: list(array.shape) for name, array in trainer.parameter_arrays().items()}
    checks = [("gathers: 2 steps x 2 micro-batches x (forward + backward) x 4 pieces", entered[0], "==", 32),
              ("earlier gathers alive at a gather, most", max(alive_at_gather), "==", 0),
              ("gathered arrays alive after the steps", sum(r() is not None for r in earlier), "==", 0),
              ("parameter shapes", {name: list(p.shape) for name, p in trainer.named_parameters}, "==", shapes),
              ("numbers held by each parameter between uses",
               {name: int(all(stride == 0 for stride in p.data.strides)) for name, p in trainer.named_parameters},
               "==", {name: 1 for name in shapes}),
              ("parameters reading as NaN between uses", sum(bool(xp.isnan(p.data).all()) for p in trainer.parameters),
               "==", len(trainer.parameters))]
    return report(["stage 3 frees"], checks)


def check_stage_3_replays_dropout(comm):
    """Stage 3 reruns each piece's forward in backward: with dropout on, it must draw the same
    masks again, so training matches plain data parallelism on the same layout."""
    set_default_dtype(xp.float64)
    world = Communicator(comm)
    model = dict(MODEL, dropout=0.2, n_layer=2)
    runs = [train(world, model, 2, dtype="float64", dp=world.size, microbatches=2, zero=stage, recompute=recompute)
            for stage, recompute in ((0, False), (3, False), (3, True))]
    reference = runs[0][0].gather_state()
    checks = []
    for (trainer, losses), label in zip(runs[1:], ("stage 3", "stage 3 with recomputation"), strict=True):
        checks.append((f"{label}: losses", losses, "close", runs[0][1]))
        state = trainer.gather_state()
        if world.rank == 0:
            checks += [(f"{label}: {name}, tolerance ratio", tolerance_ratio(state[name], reference[name]), "<=", 1.0)
                       for name in reference]
    return report(["stage 3 dropout"], checks)


def check_without_data_parallelism(comm):
    """--zero with dp = 1 trains exactly as without it, and world rank 0 says once that it has no effect."""
    set_default_dtype(xp.float64)
    world = Communicator(comm)
    runs = [train(world, MODEL, 2, dtype="float64", tp=2, pp=2, zero=stage, sequence_parallel=True)
            for stage in (0, 2)]
    (plain, plain_losses), (zero, zero_losses) = runs
    zero_arrays = zero.parameter_arrays()
    checks = [("gradient syncs", [type(zero.sync).__name__, type(plain.sync).__name__], "==",
               ["SingleReplica", "SingleReplica"]),
              ("losses", zero_losses, "==", plain_losses),
              ("parameters differing", sorted(name for name, array in plain.parameter_arrays().items()
                                              if not (zero_arrays[name] == array).all()), "==", [])]
    return report(["dp 1"], checks)


def check_checkpoint_arrays(comm):
    """Every stage gives the same tensor-parallel-shaped arrays, and any stage resumes from them."""
    set_default_dtype(xp.float64)
    world = Communicator(comm)
    labels, checks = [], []
    for layout in (dict(dp=2, pp=2, microbatches=2), dict(dp=2, tp=2, sequence_parallel=True)):
        saved = {}
        for stage in (0, 1, 2, 3):
            trainer, _ = train(world, MODEL, 2, dtype="float64", **layout, zero=stage)
            saved[stage] = trainer.parameter_arrays(), trainer.optimizer_state_arrays()
            for name, array in saved[stage][0].items():
                checks.append((f"stage {stage} {name}: shapes of parameter, m, stage 0's",
                               [list(array.shape), list(saved[stage][1][name]["m"].shape)], "==",
                               [list(saved[0][0][name].shape)] * 2))
                checks.append((f"stage {stage} {name} and its m, v: tolerance ratios against stage 0",
                               [tolerance_ratio(array, saved[0][0][name])] +
                               [tolerance_ratio(saved[stage][1][name][slot], saved[0][1][name][slot])
                                for slot in ("m", "v")], "all <=", 1.0))
        model_config = GPTConfig(**MODEL)
        config = TrainConfig(steps=10, batch_size=8, dtype="float64", warmup_steps=1, weight_decay=0.1, **layout)
        third = batches(config, model_config, 3)[2]
        for stage in (0, 1, 2, 3):
            straight, _ = train(world, MODEL, 3, dtype="float64", **layout, zero=stage)
            resumed, _ = train(world, MODEL, 0, dtype="float64", **layout, zero=(stage + 1) % 4)
            resumed.load_parameter_arrays(saved[stage][0])
            resumed.load_optimizer_state_arrays(saved[stage][1], step_count=2)
            resumed.train_step(*third)
            ours, theirs = resumed.gather_state(), straight.gather_state()
            if world.rank == 0:
                checks += [(f"saved under stage {stage}, resumed under {(stage + 1) % 4}: {name}, tolerance ratio",
                            tolerance_ratio(ours[name], theirs[name]), "<=", 1.0) for name in theirs]
        checks += load_error_checks(resumed, saved[0])
        labels.append(str(layout))
    return report(labels, checks)


def load_error_checks(trainer, saved):
    """A missing or misshapen array, or a moment missing, is a CheckpointError naming the parameter."""
    parameters, states = saved
    name = next(iter(parameters))
    attempts = [("parameter missing", lambda: trainer.load_parameter_arrays(
                    {key: value for key, value in parameters.items() if key != name}), name),
                ("parameter misshapen", lambda: trainer.load_parameter_arrays(
                    {**parameters, name: parameters[name].reshape(-1)[:-1]}), name),
                ("AdamW v missing", lambda: trainer.load_optimizer_state_arrays(
                    {**states, name: {"m": states[name]["m"]}}, step_count=2), f"AdamW v {name!r}")]
    checks = []
    for what, attempt, expected in attempts:
        try:
            attempt()
            message = "no error"
        except CheckpointError as error:
            message = str(error)
        checks.append((f"{what}: the error names it", message, "contains", expected))
    return checks


def tolerance_ratio(actual, expected, rtol=1e-10, atol=1e-12):
    """max |actual - expected| / (atol + rtol |expected|): at most 1 where assert_allclose passes."""
    return float((np.abs(actual - expected) / (atol + rtol * np.abs(expected))).max())
