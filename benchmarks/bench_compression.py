"""Cutting communication, measured: bytes, time and loss per method at several data-parallel sizes.

    python benchmarks/bench_compression.py [--dp 2 4 8] [--steps 200] [--out out/compression]

For each dp size it starts one ``mpiexec -n dp`` job (this file with ``--worker``) that trains the
default small GPT once per method from the same seed and the same batches: exact data parallelism,
fp16 and bf16 exchange, top-k (1%) and PowerSGD (rank 2) with error feedback, local SGD (H = 4) and
the hierarchical allreduce (nodes of 2 ranks, exact). Datasets: the built-in addition task and a text
file (by default minipar's own docs, concatenated: offline and always there). It prints, per method
and dp, the bytes each rank sent per step on the data-parallel group (from the Communicator's
counters), the time per step, and the final training loss, and draws one figure per method: its loss
curves against exact data parallelism, one panel per dataset, one line per dp.

Times come from several ranks sharing the machine's cores: compare them within one dp size only.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = {  # name -> TrainConfig options
    "exact": {},
    "fp16": {"compress": "fp16"},
    "bf16": {"compress": "bf16"},
    "topk 1%": {"compress": "topk", "topk_ratio": 0.01},
    "powersgd r2": {"compress": "powersgd", "powersgd_rank": 2},
    "local sgd H4": {"local_sgd": 4},
    "hierarchical": {"allreduce": "hierarchical", "ranks_per_node": 2},
}


def worker(arguments):
    """One mpiexec job: every method on every dataset at dp = world size; rank 0 writes JSON."""
    sys.path.insert(0, str(ROOT))
    from minipar.backend import reuse_freed_memory
    from minipar.comm import Communicator
    from minipar.data import addition_dataset, load_text_dataset
    from minipar.nn.gpt import GPTConfig
    from minipar.train import TrainConfig, Trainer

    reuse_freed_memory()
    world = Communicator()
    datasets = {"addition": (addition_dataset(), 10), "text": (load_text_dataset(arguments.text, 32), 32)}
    results = []
    for data_name, (dataset, block_size) in datasets.items():
        vocab = -(-dataset.tokenizer.vocab_size // 8) * 8
        for method, options in METHODS.items():
            if options.get("ranks_per_node", 1) > world.size or world.size % options.get("ranks_per_node", 1):
                continue
            model_config = GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=4, n_embd=64)
            config = TrainConfig(steps=arguments.steps, dp=world.size, warmup_steps=10, **options)
            trainer = Trainer(model_config, config, world)
            groups = [trainer.grid.dp, *_node_groups(trainer)]
            for group in groups:
                group.reset_counters()  # count the steps, not the start-up broadcast
            losses, seconds = [], 0.0
            for step in range(config.steps):
                inputs, targets = dataset.get_batch("train", config.batch_size, block_size, config.seed, step)
                world.barrier()
                started = time.perf_counter()
                losses.append(trainer.train_step(inputs, targets))
                seconds += time.perf_counter() - started
            sent = sum(record.bytes_sent for group in groups for record in group.counters.values())
            totals = world.mpi.gather(sent, root=0)  # small metadata
            if world.rank == 0:
                results.append({"data": data_name, "method": method, "dp": world.size, "losses": losses,
                                "bytes_per_step": max(totals) / config.steps, "ms_per_step": 1e3 * seconds / config.steps})
    if world.rank == 0:
        Path(arguments.result).write_text(json.dumps(results))


def _node_groups(trainer):
    """The hierarchical allreduce's own communicators (inside the node, across leaders), if any."""
    groups = getattr(trainer.sync, "node_groups", None)
    return [] if groups is None else [groups.intra, groups.leaders]


def run_jobs(arguments):
    from minipar.testing import find_mpiexec

    everything = []
    for dp in arguments.dp:
        result = Path(arguments.out) / f"dp{dp}.json"
        command = [find_mpiexec(sys.executable), "-n", str(dp), sys.executable, __file__, "--worker",
                   "--steps", str(arguments.steps), "--text", arguments.text, "--result", str(result)]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        print(f"dp {dp}: {' '.join(command[1:3])} ...", flush=True)
        subprocess.run(command, check=True, env=environment)
        everything += json.loads(result.read_text())
    return everything


def print_table(results):
    print(f"\n{'data':>9} {'method':>13} {'dp':>3} {'bytes/step/rank':>16} {'vs exact':>9} {'ms/step':>8} "
          f"{'final loss':>11} {'(mean of last 20)':>18}")
    exact = {(r["data"], r["dp"]): r for r in results if r["method"] == "exact"}
    for r in results:
        base = exact[(r["data"], r["dp"])]
        tail = sum(r["losses"][-20:]) / len(r["losses"][-20:])  # the last loss alone is one noisy batch
        print(f"{r['data']:>9} {r['method']:>13} {r['dp']:>3} {r['bytes_per_step']:>16,.0f} "
              f"{r['bytes_per_step'] / base['bytes_per_step']:>9.3f} {r['ms_per_step']:>8.1f} "
              f"{r['losses'][-1]:>11.4f} {tail:>18.4f}")


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["data"] for r in results})
    for method in METHODS:
        if method == "exact" or not any(r["method"] == method for r in results):
            continue
        figure, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.4), squeeze=False)
        for axis, data in zip(axes[0], datasets):
            for r in results:
                if r["data"] == data and r["method"] in (method, "exact"):
                    style = "-" if r["method"] == method else ":"
                    axis.plot(_smooth(r["losses"]), style, label=f"{r['method']}, dp {r['dp']}")
            axis.set_title(f"{method} vs exact: {data}")
            axis.set_xlabel("step")
            axis.set_ylabel("training loss (moving mean of 10)")
            axis.legend(fontsize=7)
        figure.tight_layout()
        path = Path(out) / f"loss_{method.replace(' ', '_').replace('%', 'pct')}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        print(f"wrote {path}")


def _smooth(values, width=10):
    return [sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1])
            for i in range(len(values))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--text", default=None, help="a UTF-8 text file; default: docs/*.md concatenated")
    parser.add_argument("--out", default="out/compression")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        return worker(arguments)
    Path(arguments.out).mkdir(parents=True, exist_ok=True)
    if arguments.text is None:
        arguments.text = str(Path(arguments.out) / "docs_corpus.txt")
        Path(arguments.text).write_text("\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))))
    results = run_jobs(arguments)
    print_table(results)
    plot(results, arguments.out)


if __name__ == "__main__":
    main()
