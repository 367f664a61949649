"""ZeRO's gradient copy into the reduce-scatter input: bytes and time per step, before and now.

    mpiexec -n 2 python benchmarks/bench_zero_copies.py [--steps 20] [--stage 1] [--n-layer 2] [--n-embd 64]

Trains the README's main-job model (the addition task's vocabulary 16, context 10, 2 layers, width
64, 4 heads, global batch 64, float32) under ``--dp N --zero STAGE`` (N = the ranks). Each unit's
reduce-scatter input is rank-major, so every gradient is copied in once (parallel/zero.py,
"Copies"). Measured on the step's own gradient shapes, on every rank, per step:

  before   the earlier packing: a zeroed (N, S) unit buffer, then per parameter ``Zero._rows`` (a
           zeroed (N, s) array, the gradient copied in) copied into the unit buffer's columns
  now      ``Zero._gradient_rows``: one copy per gradient into an empty buffer, zeros in the padding
           only, and no copy for a unit of one parameter that N divides

Printed by rank 0: bytes written, read and allocated per step by each (counted from the unit
layout, the same on every rank), and the median over steps of (copy time / train_step time) for
each, with before/now. The step is timed alone, then both packings run on fresh arrays shaped like
the gradients, in alternating order; on a loaded machine read the ratios, not the milliseconds.
"""
import argparse
import statistics
import time

from minipar._threads import start_process  # noqa: E402

start_process()  # the CLI's process-wide settings first: BLAS threads, MPICH's wait, Ctrl-C (minipar/_threads.py)

from minipar.backend import from_host, host_rng, xp  # noqa: E402
from minipar.comm import Communicator  # noqa: E402
from minipar.nn.gpt import GPTConfig  # noqa: E402
from minipar.parallel.zero import part_length  # noqa: E402
from minipar.train import TrainConfig, Trainer  # noqa: E402


def packed_as_before(zero, unit):
    """The reduce-scatter input as zero.py built it before: a zeroed unit buffer, then each
    gradient through ``Zero._rows`` (a second zeroed padded array) into its columns."""
    rows = xp.zeros((zero.count, unit.length), dtype=unit.parameters[0].dtype)
    for p, place in unit.slots():
        if p.grad is not None:
            rows[:, place] = zero._rows(p, p.grad)
        p.grad = None
    return rows


def bytes_per_step(zero, itemsize):
    """{way: (written, read, allocated)} bytes of one step's packing, from the unit layout."""
    before, now = [0, 0, 0], [0, 0, 0]
    for unit in zero.units:
        padded = [zero.count * part_length(p.size, zero.count) for p in unit.parameters]
        before[0] += zero.count * unit.length + sum(2 * n_padded + p.size for p, n_padded in zip(
            unit.parameters, padded, strict=True))  # unit zeros; per p: zeros, copy in, copy over
        before[1] += sum(p.size + n_padded for p, n_padded in zip(unit.parameters, padded, strict=True))
        before[2] += zero.count * unit.length + sum(padded)
        alone = len(unit.parameters) == 1 and unit.parameters[0].size == zero.count * unit.length
        if not alone:
            now[0] += zero.count * unit.length  # each number once: the gradient or a padding zero
            now[1] += sum(p.size for p in unit.parameters)
            now[2] += zero.count * unit.length
    return {"before": [itemsize * b for b in before], "now": [itemsize * b for b in now]}


def timed_packing(zero, shapes, pack):
    """Seconds to pack every unit once from fresh gradient-shaped arrays (made outside the timing)."""
    for p in zero.parameters:
        p.grad = xp.ones(shapes[id(p)], dtype=p.dtype)
    started = time.perf_counter()
    for unit in zero.units:
        pack(unit)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    arguments = parser.parse_args()
    world = Communicator()
    model_config = GPTConfig(vocab_size=16, block_size=10, n_layer=arguments.n_layer, n_head=4,
                             n_embd=arguments.n_embd)
    config = TrainConfig(steps=arguments.steps + 1, batch_size=64, dtype="float32", warmup_steps=1, dp=world.size,
                         zero=arguments.stage)
    trainer = Trainer(model_config, config, world)
    zero = trainer.sync
    shapes = {id(p): p.shape for p in zero.parameters}
    ratios = {"before": [], "now": []}
    for step in range(arguments.steps + 1):
        tokens = from_host(host_rng([5, step]).integers(0, model_config.vocab_size, (64, 11)))
        world.barrier()
        started = time.perf_counter()
        trainer.train_step(xp.ascontiguousarray(tokens[:, :-1]), xp.ascontiguousarray(tokens[:, 1:]))
        step_seconds = time.perf_counter() - started
        ways = [("before", lambda unit: packed_as_before(zero, unit)), ("now", zero._gradient_rows)]
        for name, pack in ways if step % 2 else reversed(ways):
            seconds = timed_packing(zero, shapes, pack)
            if step:  # the first step warms up
                ratios[name].append(seconds / step_seconds)
    if world.rank == 0:
        counted = bytes_per_step(zero, xp.dtype(config.dtype).itemsize)
        psi = sum(p.size for p in zero.parameters)
        print(f"ZeRO-{arguments.stage}, dp {world.size}, {psi} parameters on this rank in {len(zero.units)} units, "
              f"{arguments.steps} steps")
        for name in ("before", "now"):
            written, read, allocated = counted[name]
            print(f"  {name:6}  copy in: written {written:>9} B, read {read:>9} B, allocated {allocated:>9} B "
                  f"per step;  median copy / step {statistics.median(ratios[name]):.4f}")
        paired = [b / n for b, n in zip(ratios["before"], ratios["now"], strict=True)]
        print(f"  before / now, copy-in time: median {statistics.median(paired):.2f}")


if __name__ == "__main__":
    main()
