"""The figures and tables of docs/mixed_precision.md, measured (each part prints what it found).

    python scripts/mixed_precision_figures.py gradients    # docs/images/mixed_precision_gradients.png
    python scripts/mixed_precision_figures.py loss-scale   # docs/images/mixed_precision_loss_scale.png
    python scripts/mixed_precision_figures.py memory       # the ZeRO table, bf16, 8 ranks (starts mpiexec)
    python scripts/mixed_precision_figures.py layouts      # 16-bit vs float64 per layout (2 and 8 ranks)

``gradients`` and ``loss-scale`` train one process on the built-in addition task; ``memory`` and
``layouts`` run the rank bodies of tests/test_mixed_precision.py and print markdown tables.
"""
import argparse
from pathlib import Path

import numpy as np

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
FP16_MAX, FP16_TINIEST_NORMAL, FP16_TINIEST = 65504.0, 2.0**-14, 2.0**-24


def addition_trainer(precision, steps, model=None, **options):
    from minipar.comm import Communicator
    from minipar.data import addition_dataset
    from minipar.nn.gpt import GPTConfig
    from minipar.train import TrainConfig, Trainer

    dataset = addition_dataset()
    vocab = -(-dataset.tokenizer.vocab_size // 8) * 8  # the CLI's model for 2 digits: --vocab-multiple 8, block 10
    model_config = GPTConfig(vocab_size=vocab, block_size=10, **(model or {}))
    config = TrainConfig(steps=steps, precision=precision, **options)
    return dataset, model_config, config, Trainer(model_config, config, Communicator())


def batch(dataset, config, model_config, step):
    return dataset.get_batch("train", config.batch_size, model_config.block_size, config.seed, step)


def gradients():
    """|g| of every parameter after 200 steps of fp32 training, against fp16's range: what underflows
    to zero or to a subnormal without a loss scale, and with S = 2^16."""
    import matplotlib.pyplot as plt

    dataset, model_config, config, trainer = addition_trainer("fp32", 2000)
    for step in range(200):
        trainer.train_step(*batch(dataset, config, model_config, step))
    trainer.compute_gradients(*batch(dataset, config, model_config, 200))
    values = np.abs(np.concatenate([t.grad.reshape(-1) for t in trainer.sync.updated]).astype(np.float64))
    values = values[values > 0]
    rows = []
    for scale in (1.0, 2.0**16):
        scaled = values * scale
        rows.append((scale, float(np.mean(scaled < FP16_TINIEST / 2)),
                     float(np.mean((scaled >= FP16_TINIEST / 2) & (scaled < FP16_TINIEST_NORMAL))),
                     float(np.mean(scaled > FP16_MAX))))
    figure, axis = plt.subplots(figsize=(8, 3.6))
    axis.hist(np.log2(values), bins=120, color="#3f51b5")
    for x, label in ((np.log2(FP16_TINIEST), "fp16 smallest subnormal 2^-24"),
                     (np.log2(FP16_TINIEST_NORMAL), "fp16 smallest normal 2^-14"),
                     (np.log2(FP16_MAX), "fp16 max 65504"), (np.log2(FP16_TINIEST) - 16, "2^-24 / S, S = 2^16")):
        axis.axvline(x, color="#c62828" if "S =" not in label else "#2e7d32", linestyle="--", linewidth=1)
        axis.text(x, axis.get_ylim()[1] * 0.95, " " + label, rotation=90, va="top", fontsize=7)
    axis.set_xlabel("log2 |gradient|, every parameter of the addition GPT at step 200 (fp32 run)")
    axis.set_ylabel("elements")
    IMAGES.mkdir(parents=True, exist_ok=True)
    figure.savefig(IMAGES / "mixed_precision_gradients.png", dpi=110, bbox_inches="tight")
    print(f"{values.size} non-zero gradient elements; smallest |g| = {values.min():.3g}, largest {values.max():.3g}")
    print("| loss scale S | flushed to 0 in fp16 | subnormal in fp16 (fewer than 10 bits) | overflow |")
    print("|---|---|---|---|")
    for scale, zero, subnormal, over in rows:
        print(f"| {scale:g} | {zero:.2%} | {subnormal:.2%} | {over:.2%} |")


SMALL = dict(n_layer=2, n_head=4, n_embd=64)  # the loss-scale runs: a smaller GPT, so 2 x 600 fp16 steps stay short


def loss_scale(steps=600):
    """S per step of fp16 runs of the addition task (``SMALL``): GradScaler's defaults, and a growth
    interval of 100."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.2))
    for growth_interval in (2000, 100):
        dataset, model_config, config, trainer = addition_trainer("fp16", 2000, model=SMALL)
        trainer.precision.scaler.growth_interval = growth_interval
        scales, skipped, losses = [], [], []
        for step in range(steps):
            scales.append(trainer.precision.scale)  # the scale this step's loss is multiplied by
            before = trainer.precision.skipped_steps
            losses.append(trainer.train_step(*batch(dataset, config, model_config, step)))
            if trainer.precision.skipped_steps > before:
                skipped.append(step)
        label = f"growth interval {growth_interval}" + (" (GradScaler's default)" if growth_interval == 2000 else "")
        line, = axis.step(range(steps), np.log2(scales), where="post", label=label)
        axis.plot(skipped, [np.log2(scales[s]) for s in skipped], "x", color=line.get_color())
        print(f"{label}: skipped steps {skipped}; S from 2^{np.log2(scales[0]):g} to 2^{np.log2(scales[-1]):g}; "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    axis.set_xlabel(f"step (x: an overflow, the step skipped and S halved); GPT {SMALL} on the addition task")
    axis.set_ylabel("log2 S")
    axis.legend(fontsize=8)
    figure.savefig(IMAGES / "mixed_precision_loss_scale.png", dpi=110, bbox_inches="tight")


def memory():
    from minipar.testing import results_from_ranks

    rows = results_from_ranks(8, "tests.mpi_bodies.mixed_precision_body:memory_against_formulas", timeout=3000)[0]
    psi = rows[0]["psi"]
    print(f"Ψ = {psi:,} parameters, N = 8, bf16, bytes on rank 0 after a step")
    print("| ZeRO stage | parameters | gradients | optimizer (master, m, v) | measured | formula | planner |")
    print("|---|---|---|---|---|---|---|")
    names = {0: "0: 16Ψ", 1: "1: (4 + 12/N)Ψ", 2: "2: (2 + 14/N)Ψ", 3: "3: 16Ψ/N"}
    for row in rows:
        m = row["measured"]
        print(f"| {names[row['stage']]} | {m['parameters']:,} | {m['gradients']:,} | {m['optimizer_states']:,} | "
              f"{row['held']:,} | {row['formula']:,.0f} | {row['planner_total']:,.0f} |")


def layouts():
    from minipar.testing import results_from_ranks
    from tests.test_mixed_precision import LAYOUTS

    print("| ranks | layout | precision | max abs θ16 − θ64 after 20 steps | bound | skipped | equals one process |")
    print("|---|---|---|---|---|---|---|")
    for nranks, cases in sorted(LAYOUTS.items()):
        for precision in ("bf16", "fp16"):
            asked = [dict(layout, precision=precision, reference_microbatches=m) for layout, m, _ in cases]
            for case in results_from_ranks(nranks, "tests.mpi_bodies.mixed_precision_body:against_references",
                                           cases=asked, steps=20, timeout=3000)[0]:
                layout = {k: v for k, v in case["case"].items() if k not in ("precision", "reference_microbatches")}
                print(f"| {nranks} | {layout} | {precision} | {case['difference']:.4f} | {case['bound']:.4f} | "
                      f"{case['skipped_steps']} | {'yes' if case['equals_one_process'] else 'no'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=["gradients", "loss-scale", "memory", "layouts"])
    choice = parser.parse_args().figure
    import matplotlib

    matplotlib.use("Agg")
    {"gradients": gradients, "loss-scale": loss_scale, "memory": memory, "layouts": layouts}[choice]()


if __name__ == "__main__":
    main()
