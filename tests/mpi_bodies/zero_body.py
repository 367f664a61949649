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
from minipar.parallel.gradient_sync import SingleReplica
from minipar.train import Trainer, TrainConfig
from tests.mpi_bodies.equivalence_body import MODEL, batches

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
    set_default_dtype(xp.float32)
    world = Communicator(comm)
    # (dp 4, pp 1): padded parts, and the tied embedding in two pieces of one rank;
    # (dp 2, pp 2): no padding, every parameter in one piece: the exact DP volume and 1.5x.
    for layout, model in ((dict(dp=4), dict(PADDED, n_layer=4)), (dict(dp=2, pp=2), MODEL)):
        bulk = {}  # stage -> bytes this rank sent in the step's data-parallel gradient/parameter traffic
        for stage in (0, 1, 2, 3):
            trainer, _ = train(world, model, 2, **layout, zero=stage)
            count, rank = trainer.grid.dp.size, trainer.grid.dp_rank
            counters, report = trainer.grid.dp.counters_snapshot(), trainer.memory_report()
            sizes = {name: array.size for name, array in trainer.parameter_arrays().items()}
            psi = sum(sizes.values())
            padded = sum(count * -(-n // count) for n in sizes.values())
            tied_twice = layout.get("pp", 1) == 1  # the embedding and the head share the weight on this rank
            tied_padded = count * -(-sizes[TIED] // count) if tied_twice else 0
            pieces = [[sizes[p.shard.full_name] for p in piece.parameters()] for chunk in trainer.chunks
                      for piece in chunk.pieces]
            largest_piece, second_piece = sorted(sum(piece) for piece in pieces)[-1:-3:-1]
            largest_padded_piece = max(sum(count * -(-n // count) for n in piece) for piece in pieces)
            if stage == 0:
                expected = dict(parameters=4 * psi, gradients=4 * psi, optimizer_states=8 * psi,
                                data_parallel_buckets=4 * psi)
                scalar = modelled_traffic("allreduce", rank, count, 1, 8).bytes_sent  # the shared loss
                bulk[0] = counters["allreduce"]["bytes_sent"] - scalar
                if padded == psi:  # otherwise the ring's blocks, and the bytes, differ from rank to rank
                    assert bulk[0] == 2 * (count - 1) * 4 * psi // count, (bulk, psi)
            else:
                expected = dict(parameters=4 * padded // (count if stage == 3 else 1),
                                gradients=4 * padded // count, optimizer_states=8 * padded // count)
                reduce_scatter, all_gather = (counters[name]["bytes_sent"] for name in ("reduce_scatter", "allgather"))
                assert reduce_scatter == (count - 1) * 4 * padded // count, (stage, reduce_scatter, padded)
                # Stage 3 gathers before the forward and again in the backward, and the tied
                # weight (pp = 1) once for each of its two pieces.
                gathered = padded if stage < 3 else 2 * (padded + tied_padded)
                assert all_gather == (count - 1) * 4 * gathered // count, (stage, all_gather)
                bulk[stage] = reduce_scatter + all_gather
            assert {key: report[key] for key in expected} == expected, (layout, stage, report, expected)
            assert report["total"] == sum(report[key] for key in ("parameters", "gradients", "optimizer_states"))
            if stage == 1:  # every full gradient exists at once at the end of backward, as the paper counts
                assert report["peak_full_gradients"] == 4 * psi, report
            if stage >= 2:  # a full gradient lives until its unit is complete: about one piece at a time
                assert report["peak_full_gradients"] <= 4 * (largest_piece + second_piece), report
                assert report["peak_full_gradients"] < 4 * psi / 2, report
            if stage == 3:  # one piece's gathered parameters, plus the all-gather buffer they are cut from
                assert 4 * largest_piece <= report["peak_gathered_parameters"] <= 8 * largest_padded_piece, report
            paper = {0: 16 * psi, 1: 8 * psi + 8 * psi / count, 2: 4 * psi + 12 * psi / count, 3: 16 * psi / count}
            # Stage 1 keeps gradients whole, as the paper counts them, until the reduce-scatter.
            held = report["total"] + (report["peak_full_gradients"] - report["gradients"] if stage == 1 else 0)
            assert padded != psi or held == paper[stage], (stage, held, paper[stage])
            if world.rank == 0:
                print(f"{layout} stage {stage}: psi {psi} (padded {padded}), paper's formula {paper[stage]:.0f} B, "
                      f"measured {report}, traffic sent {bulk[stage]} B", flush=True)
        if padded == psi:
            assert bulk[1] == bulk[2] == bulk[0] and 2 * bulk[3] == 3 * bulk[0], bulk
        world.mpi.Barrier()
        if world.rank == 0:
            print(f"memory and traffic ok: {layout}", flush=True)


def check_stage_3_frees_gathered_parameters(comm):
    """Stage 3: a piece's gathered parameters are gone by the time the next piece gathers its own
    (forward or backward, any micro-batch), so no graph or stash keeps one alive."""
    set_default_dtype(xp.float32)
    world = Communicator(comm)
    model_config = GPTConfig(**PADDED)
    config = TrainConfig(steps=10, batch_size=8, dp=world.size, zero=3, microbatches=2)
    trainer = Trainer(model_config, config, world)
    zero, earlier, entered = trainer.sync, [], [0]
    gathered = zero.gathered

    @contextmanager
    def watched(units):
        still_alive = sum(reference() is not None for reference in earlier)
        assert still_alive == 0, f"{still_alive} arrays of earlier gathers are still alive"
        with gathered(units):
            entered[0] += 1
            earlier.extend(weakref.ref(p.data.base) for unit in units for p in unit.parameters)
            yield

    zero.gathered = watched
    for inputs, targets in batches(config, model_config, 2):
        trainer.train_step(inputs, targets)
    # 2 steps x 2 micro-batches x (forward + backward) x (embedding, 2 blocks, head)
    assert entered[0] == 2 * 2 * 2 * 4 and all(reference() is None for reference in earlier), entered
    # Between uses a parameter keeps its shape but holds one number (a NaN stand-in), not its part.
    shapes = {name: array.shape for name, array in trainer.parameter_arrays().items()}
    for name, p in trainer.named_parameters:
        assert p.shape == shapes[name] and p.data.strides == (0,) * p.ndim and xp.isnan(p.data).all(), name
    if world.rank == 0:
        print("stage 3 frees ok", flush=True)


def check_stage_3_replays_dropout(comm):
    """Stage 3 reruns each piece's forward in backward: with dropout on, it must draw the same
    masks again, so training matches plain data parallelism on the same layout."""
    set_default_dtype(xp.float64)
    world = Communicator(comm)
    model = dict(MODEL, dropout=0.2, n_layer=2)
    runs = [train(world, model, 2, dtype="float64", dp=world.size, microbatches=2, zero=stage, recompute=recompute)
            for stage, recompute in ((0, False), (3, False), (3, True))]
    reference = runs[0][0].gather_state()
    for trainer, losses in runs[1:]:
        np.testing.assert_allclose(losses, runs[0][1], rtol=1e-12)
        state = trainer.gather_state()
        if world.rank == 0:
            for name in reference:
                close(state[name], reference[name], name)
    if world.rank == 0:
        print("stage 3 dropout ok", flush=True)


def check_without_data_parallelism(comm):
    """--zero with dp = 1 trains exactly as without it, and world rank 0 says once that it has no effect."""
    set_default_dtype(xp.float64)
    world = Communicator(comm)
    runs = [train(world, MODEL, 2, dtype="float64", tp=2, pp=2, zero=stage, sequence_parallel=True)
            for stage in (0, 2)]
    (plain, plain_losses), (zero, zero_losses) = runs
    assert type(zero.sync) is type(plain.sync) is SingleReplica and plain_losses == zero_losses
    for name, array in plain.parameter_arrays().items():
        assert (zero.parameter_arrays()[name] == array).all(), name
    if world.rank == 0:
        print("dp 1 ok", flush=True)


def check_checkpoint_arrays(comm):
    """Every stage gives the same tensor-parallel-shaped arrays, and any stage resumes from them."""
    set_default_dtype(xp.float64)
    world = Communicator(comm)
    for layout in (dict(dp=2, pp=2, microbatches=2), dict(dp=2, tp=2, sequence_parallel=True)):
        saved = {}
        for stage in (0, 1, 2, 3):
            trainer, _ = train(world, MODEL, 2, dtype="float64", **layout, zero=stage)
            saved[stage] = trainer.parameter_arrays(), trainer.optimizer_state_arrays()
            shards = {p.shard.full_name: p.shard for p in trainer.parameters}
            for name, array in saved[stage][0].items():
                assert saved[stage][1][name]["m"].shape == array.shape == saved[0][0][name].shape, name
                assert shards[name].full_name == name
                close(array, saved[0][0][name], name)
                for slot in ("m", "v"):
                    close(saved[stage][1][name][slot], saved[0][1][name][slot], f"{name} {slot}")
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
                for name in theirs:
                    close(ours[name], theirs[name], f"resumed {name}")
        check_load_errors(resumed, saved[0])
        world.mpi.Barrier()
        if world.rank == 0:
            print(f"checkpoint arrays ok: {layout}", flush=True)


def check_load_errors(trainer, saved):
    parameters, states = saved
    name = next(iter(parameters))
    for broken in ({key: value for key, value in parameters.items() if key != name},
                   {**parameters, name: parameters[name].reshape(-1)[:-1]}):
        try:
            trainer.load_parameter_arrays(broken)
        except CheckpointError as error:
            assert name in str(error), error
        else:
            raise AssertionError("a missing or misshapen parameter array was accepted")
    try:
        trainer.load_optimizer_state_arrays({**states, name: {"m": states[name]["m"]}}, step_count=2)
    except CheckpointError as error:
        assert name in str(error) and " v " in str(error), error
    else:
        raise AssertionError("an optimizer state without v was accepted")


def close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12, err_msg=what)
