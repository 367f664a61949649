"""Context parallelism: bytes against the formulas, attention work per rank, and memory at a long block.

    python benchmarks/bench_context_parallel.py                       # cp 1, 2, 4, 8 at block 1024: one table
    python benchmarks/bench_context_parallel.py --sizes 8 --length 2048
    python benchmarks/bench_context_parallel.py --sizes 8 --train-steps 20   # then train at cp 8 and on one process
    mpiexec -n 8 python benchmarks/bench_context_parallel.py          # one size (cp = ranks), JSON lines

A small GPT (2 layers, 4 heads, width 64, vocabulary 64) on a batch of 2 sequences of
``--length`` tokens, float32, forward and backward; cp 1 is the plain single-process GPT. Each
rank holds its T/cp tokens (``split_tokens``), the model runs with ``use_context_parallel``.

Columns (rank 0's communicator unless said; per layer: the step's counters / n_layer):
  fwd/bwd sent   elements sent per rank per layer, measured; "formula" is 2(N-1) B (T/N) C
                 forward, and backward 4(N-1) B (T/N) C for the ring (K, V and dK, dV), 2(N-1)
                 B (T/N) C for all-gather (the reduce-scatter of dK, dV);
  work max/mean  the causal work (score entries, a diagonal block half) of the busiest rank
                 over the mean: (2N-1)/N contiguous, 1 zigzag;
  scores MB      the largest attention-scores array a rank held at once, vs one process's
                 B H T^2 (the ring holds (T/N)^2 per head, all-gather (T/N) T);
  saved MB       activations kept for backward, peak, busiest rank (``plan.measure.SavedBytes``:
                 parameters and token ids excluded): falls as T/N, and the ring keeps no scores;
  peak MB        the highest memory NumPy had allocated during forward and backward on the
                 busiest rank (tracemalloc), the model's parameters excluded;
  step ms        forward + backward, slowest rank, median. With N ranks on fewer cores the
                 ranks share them: times show the cost of splitting, not a speed-up.
"""
import argparse
import json
import statistics
import time
import traceback

MODEL = dict(vocab_size=64, n_layer=2, n_head=4, n_embd=64)
BATCH = 2
JOBS = [("contiguous", "ring", False), ("zigzag", "ring", False), ("zigzag", "ring", True),
        ("zigzag", "allgather", False)]


def worker(comm, length, layout, variant, overlap, steps, plain=False):
    """On every rank (``comm`` = MPI.COMM_WORLD, cp = all ranks); rank 0 prints one JSON line."""
    import tracemalloc

    from mpi4py import MPI

    from minipar.backend import host_rng
    from minipar.comm import Communicator
    from minipar.nn.gpt import GPT, GPTConfig
    from minipar.parallel.context_parallel_model import split_tokens, use_context_parallel
    from minipar.plan.measure import SavedBytes
    from minipar.tensor import observe_saved

    communicator = Communicator(comm)
    rank, size = communicator.rank, communicator.size
    config = GPTConfig(**MODEL, block_size=length)
    model = GPT(config, dtype="float32")
    works = [] if plain else use_context_parallel(model, communicator, layout, variant, overlap)
    generator = host_rng(0)
    ids, targets = (generator.integers(0, config.vocab_size, (BATCH, length)) for _ in range(2))
    if not plain:
        ids, targets = (split_tokens(a, rank, size, layout) for a in (ids, targets))
    seconds, sent = [], {}
    for _ in range(steps):
        model.zero_grad()
        communicator.reset_counters()
        tracemalloc.start()
        comm.Barrier()
        started = time.perf_counter()
        saved = SavedBytes(model.parameters())
        with observe_saved(saved):
            _, loss = model(ids, targets)
        sent["forward"] = communicator.counters_snapshot()
        communicator.reset_counters()
        loss.backward()
        elapsed = time.perf_counter() - started
        sent["backward"] = communicator.counters_snapshot()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        seconds.append(comm.allreduce(elapsed, op=MPI.MAX))
    elements = {phase: sum(r["bytes_sent"] for r in counters.values()) / 4 / config.n_layer
                for phase, counters in sent.items()}
    work = [w.causal_entries / steps for w in works[:1]]  # the first block's: every block does the same
    all_work = comm.gather(work[0] if work else 0.0)
    peak_mb = comm.allreduce(peak / 1e6, op=MPI.MAX)
    saved_mb = comm.allreduce(saved.peak / 1e6, op=MPI.MAX)
    if rank == 0:
        block = BATCH * (length // size) * config.n_embd
        scores = (works[0].peak_score_elements if works else BATCH * config.n_head * length * length)
        print("RESULT " + json.dumps({
            "cp": size, "layout": "-" if plain else layout, "variant": "gpt" if plain else variant,
            "overlap": overlap, "forward_elements": elements["forward"], "backward_elements": elements["backward"],
            "forward_formula": 2 * (size - 1) * block,
            "backward_formula": (4 if variant == "ring" else 2) * (size - 1) * block,
            "work": all_work, "work_ratio": max(all_work) / (sum(all_work) / size) if works else 1.0,
            "scores_mb": scores * 4 / 1e6, "one_process_scores_mb": BATCH * config.n_head * length ** 2 * 4 / 1e6,
            "peak_mb": peak_mb, "saved_mb": saved_mb, "step_ms": 1e3 * statistics.median(seconds),
        }), flush=True)


def train(comm, length, steps, plain=False):
    """A few AdamW steps at a long block on this job's ranks (cp = all of them); rank 0 prints the losses.

    The data is a pattern a model learns fast (token t+1 follows from token t), so the loss falls
    within a few steps; gradients are averaged over the cp group as the Trainer would.
    """
    import numpy as np
    from mpi4py import MPI

    from minipar.comm import Communicator
    from minipar.nn.gpt import GPT, GPTConfig
    from minipar.optim import AdamW
    from minipar.parallel.context_parallel_model import split_tokens, use_context_parallel

    communicator = Communicator(comm)
    rank, size = communicator.rank, communicator.size
    config = GPTConfig(**MODEL, block_size=length)
    model = GPT(config, dtype="float32")
    if not plain:
        use_context_parallel(model, communicator, "zigzag", "ring", overlap=True)
    optimizer = AdamW(model.parameters(), lr=3e-3)
    pattern = (np.arange(length + 1)[None, :] * np.array([[5], [7]]) + np.array([[1], [3]])) % config.vocab_size
    ids, targets = pattern[:, :-1], pattern[:, 1:]
    if not plain:
        ids, targets = (split_tokens(a, rank, size, "zigzag") for a in (ids, targets))
    losses = []
    for _ in range(steps):
        model.zero_grad()
        _, loss = model(ids, targets)
        loss.backward()
        for p in model.parameters():
            communicator.allreduce(p.grad)
            p.grad /= size
        losses.append(comm.allreduce(loss.item(), op=MPI.SUM) / size)
        optimizer.step()
    if rank == 0:
        print("RESULT " + json.dumps({"cp": size, "losses": losses}), flush=True)


def launch_training(size, length, steps):
    from minipar.testing import run_on_ranks

    print(f"\n{steps} AdamW steps at block {length}, zigzag ring with overlap; loss per step (mean over cp)")
    for ranks, plain in ((1, True), (size, False)):
        output = run_on_ranks(ranks, "benchmarks.bench_context_parallel:train", timeout=600, length=length,
                              steps=steps, plain=plain)
        r = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
        print(f"cp {ranks}: " + " ".join(f"{loss:.4f}" for loss in r["losses"]), flush=True)


def launch(sizes, length, steps):
    from minipar.testing import run_on_ranks

    print(f"context parallelism, GPT {MODEL}, batch {BATCH}, block {length}, float32; "
          f"median of {steps} forward+backward steps; elements per rank per layer")
    print(f"{'cp':>3} {'layout':>10} {'variant':>9} {'ovl':>3} {'fwd sent':>9} {'formula':>9} {'bwd sent':>9} "
          f"{'formula':>9} {'work max/mean':>13} {'scores MB':>10} {'1-proc MB':>9} {'saved MB':>8} {'peak MB':>8} "
          f"{'step ms':>8}")
    jobs = [(1, "contiguous", "ring", False, True)]
    jobs += [(size, *job, False) for size in sizes for job in JOBS]
    for size, layout, variant, overlap, plain in jobs:
        output = run_on_ranks(size, "benchmarks.bench_context_parallel:worker", timeout=600, length=length,
                              layout=layout, variant=variant, overlap=overlap, steps=steps, plain=plain)
        r = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
        print(f"{r['cp']:>3} {r['layout']:>10} {r['variant']:>9} {'on' if overlap else '':>3} "
              f"{r['forward_elements']:>9.0f} {r['forward_formula']:>9.0f} {r['backward_elements']:>9.0f} "
              f"{r['backward_formula']:>9.0f} {r['work_ratio']:>13.4f} {r['scores_mb']:>10.2f} "
              f"{r['one_process_scores_mb']:>9.2f} {r['saved_mb']:>8.1f} {r['peak_mb']:>8.1f} {r['step_ms']:>8.0f}",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8], help="cp sizes to launch")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence (the block size)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="then train this many AdamW steps at cp = the largest size and on one process")
    arguments = parser.parse_args()
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        launch(arguments.sizes, arguments.length, arguments.steps)
        if arguments.train_steps:
            launch_training(max(arguments.sizes), arguments.length, arguments.train_steps)
        return
    try:
        for layout, variant, overlap in JOBS:
            worker(world, arguments.length, layout, variant, overlap, arguments.steps)
    except BaseException:  # a failing rank must end the job, not leave the others waiting
        traceback.print_exc()
        world.Abort(1)


if __name__ == "__main__":
    main()
