"""Tensor-parallel training step: time and bytes moved per step for tp = 1, 2, 4, with and without SP.

    python benchmarks/bench_tensor_parallel.py                 # launches tp = 1, 2, 4 and prints one table
    python benchmarks/bench_tensor_parallel.py --sizes 2 8     # chosen sizes
    mpiexec -n 4 python benchmarks/bench_tensor_parallel.py    # one size (tp = number of ranks), JSON lines

The small GPT of the lessons (n_layer 4, n_head 4, n_embd 128, block 64, vocabulary 64 so
that every tp divides it), a batch of 12 sequences, float32, AdamW. One step is forward,
backward, the sequence-parallel gradient sum and the optimizer update on this rank's
shards; its time is the slowest rank's, from a common start after a barrier, and the table
shows the median over the timed steps.

"sent MB" is what rank 0's tp communicator recorded per step (for MPI's built-in
collectives: the ring volumes, 2(t-1)/t n per allreduce and (t-1)/t n per all-gather or
reduce-scatter). "layers MB" is Narayanan et al. 2021's 8 b s h (t-1)/t elements per layer
per micro-batch, times L; the rest is the embedding, the head and (SP) the LayerNorm
gradient sum. With t ranks on fewer cores than t the ranks share cores: the time then
shows the cost of splitting, not a speed-up.
"""
import argparse
import json
import os
import statistics
import time
import traceback

MODEL = dict(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=128)
BATCH = 12


def worker(comm, sequence_parallel, warmup, steps, plain=False):
    """On every rank of an mpiexec job (``comm`` = MPI.COMM_WORLD): time training steps with
    tp = all ranks; rank 0 prints one JSON line. ``plain``: GPT's own pieces, the baseline."""
    from mpi4py import MPI

    from minipar.backend import host_rng
    from minipar.comm import Communicator
    from minipar.nn.gpt import GPT, GPTConfig
    from minipar.optim import AdamW
    from minipar.parallel.sequence_parallel import finish_tensor_parallel_gradients
    from minipar.parallel.tensor_parallel import tensor_parallel_pieces

    tp_comm = Communicator(comm)
    config = GPTConfig(**MODEL)
    pieces = GPT(config).pieces() if plain else tensor_parallel_pieces(config, tp_comm, sequence_parallel)
    parameters = list({id(p): p for piece in pieces for p in piece.parameters()}.values())
    optimizer = AdamW(parameters, lr=1e-3)
    generator = host_rng(0)

    def step():
        ids = generator.integers(0, config.vocab_size, (BATCH, config.block_size))
        targets = generator.integers(0, config.vocab_size, (BATCH, config.block_size))
        for p in parameters:
            p.grad = None
        x = ids
        for piece in pieces[:-1]:
            x = piece(x)
        pieces[-1](x, targets).backward()
        finish_tensor_parallel_gradients(parameters, tp_comm)
        optimizer.step()

    for _ in range(warmup):
        step()
    tp_comm.reset_counters()
    seconds = []
    for _ in range(steps):
        tp_comm.mpi.Barrier()
        started = time.perf_counter()
        step()
        seconds.append(tp_comm.mpi.allreduce(time.perf_counter() - started, op=MPI.MAX))
    counters = tp_comm.counters_snapshot()
    if tp_comm.rank == 0:
        t, bsh = tp_comm.size, BATCH * config.block_size * config.n_embd
        print("RESULT " + json.dumps({
            "tp": "gpt" if plain else t, "sequence_parallel": sequence_parallel,
            "step_ms": 1e3 * statistics.median(seconds),
            "comm_ms": 1e3 * sum(r["seconds"] for r in counters.values()) / steps,
            "calls": sum(r["calls"] for r in counters.values()) / steps,
            "sent_mb": sum(r["bytes_sent"] for r in counters.values()) / steps / 1e6,
            "layers_mb": 8 * bsh * (t - 1) / t * config.n_layer * 4 / 1e6,
            "by_collective": {name: r["calls"] // steps for name, r in counters.items()},
        }), flush=True)


def launch(sizes, warmup, steps):
    """Run one mpiexec job per (tp, SP) and print the table.

    ``run_on_ranks`` (the test harness) gives each job one BLAS thread per rank, ends the
    whole job if a rank fails and kills it if it hangs.
    """
    from minipar.testing import run_on_ranks

    print(f"tensor-parallel step, GPT {MODEL}, batch {BATCH}, float32, {os.cpu_count()} cores; "
          f"median of {steps} steps after {warmup} warm-up")
    print(f"{'tp':>3} {'SP':>3} {'step ms':>8} {'comm ms':>8} {'tokens/s':>9} {'calls':>6} {'sent MB':>8} "
          f"{'layers MB':>10}  collectives per step")
    jobs = [(1, False, True)]  # the baseline: GPT itself, no tensor-parallel layers
    jobs += [(size, sequence_parallel, False) for size in sizes for sequence_parallel in (False, True)]
    for size, sequence_parallel, plain in jobs:
        output = run_on_ranks(size, "benchmarks.bench_tensor_parallel:worker", timeout=600, warmup=warmup,
                              steps=steps, sequence_parallel=sequence_parallel, plain=plain)
        line = next(line for line in output.splitlines() if line.startswith("RESULT "))
        r = json.loads(line[len("RESULT "):])
        tokens = BATCH * MODEL["block_size"] / (r["step_ms"] / 1e3)
        print(f"{r['tp']:>3} {'on' if sequence_parallel else 'off':>3} {r['step_ms']:>8.1f} {r['comm_ms']:>8.1f} "
              f"{tokens:>9.0f} {r['calls']:>6.0f} {r['sent_mb']:>8.2f} {r['layers_mb']:>10.2f}  "
              f"{r['by_collective']}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="tp sizes to launch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    arguments = parser.parse_args()
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        launch(arguments.sizes, arguments.warmup, arguments.steps)
        return
    try:  # started by hand under mpiexec: this size, without and with SP, one JSON line each
        for sequence_parallel in (False, True):
            worker(world, sequence_parallel, arguments.warmup, arguments.steps)
    except BaseException:  # a failing rank must end the job, not leave the others waiting
        traceback.print_exc()
        world.Abort(1)


if __name__ == "__main__":
    from minipar.backend import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: freed activation blocks stay in the heap for reuse
    main()
