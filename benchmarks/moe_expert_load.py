"""Tokens per expert over a short training run, with and without the load-balancing loss.

    python benchmarks/moe_expert_load.py [--steps 300] [--out docs/images/expert_load.png]

One process (no MPI): a 2-layer GPT whose MLPs are mixtures of E = 8 experts, top-2, capacity
factor 1.25 (minipar.nn.moe.use_experts), trains on the default addition task twice from the
same initial weights and batches, once with Switch's auxiliary loss (alpha = 0.01) and once
without (alpha = 0). At every step the router's choices before capacity are counted per expert
in layer 0; the figure shows each expert's share (a perfectly balanced router gives every
expert 1/E), and the printout the fraction of choices dropped at capacity and the largest
share at the end. Without the loss the router is free to favour a few experts, which then
overflow their capacity and drop tokens (Shazeer et al. 2017, section 4; Fedus et al. 2021,
section 2.2).
"""
import argparse
from pathlib import Path

import numpy as np

from minipar.data import addition_dataset
from minipar.nn.gpt import GPT, GPTConfig
from minipar.nn.moe import use_experts
from minipar.optim import AdamW

EXPERTS, TOP_K, CAPACITY_FACTOR = 8, 2, 1.25


def train(aux_loss_weight, steps, batch_size=32, seed=0):
    """(shares, dropped, loss): per-step layer-0 share of choices per expert (steps, E), the fraction
    dropped at capacity (steps,), and the last loss."""
    dataset = addition_dataset()
    config = GPTConfig(vocab_size=dataset.tokenizer.vocab_size, block_size=10, n_layer=2, n_head=2, n_embd=32)
    model = use_experts(GPT(config, dtype="float64"), EXPERTS, TOP_K, CAPACITY_FACTOR, aux_loss_weight)
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    shares, dropped = [], []
    for step in range(steps):
        inputs, targets = dataset.get_batch("train", batch_size, config.block_size, seed, step)
        model.zero_grad()
        _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        routing = model.blocks[0].mlp.routing
        shares.append(routing.routed.sum(axis=0) / routing.routed.sum())
        dropped.append(1.0 - routing.kept.sum() / routing.routed.sum())
    return np.array(shares), np.array(dropped), float(loss.item())


def draw(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(11, 3.6), sharey=True)
    for axis, (label, (shares, dropped, _)) in zip(axes, runs.items()):
        axis.stackplot(np.arange(len(shares)), shares.T, labels=[f"expert {e}" for e in range(EXPERTS)], alpha=0.85)
        for boundary in range(1, EXPERTS):
            axis.axhline(boundary / EXPERTS, color="white", linewidth=0.6, linestyle=":")
        axis.set_title(f"{label}\nlast 50 steps: {dropped[-50:].mean():.1%} of choices dropped, "
                       f"largest share {shares[-50:].mean(axis=0).max():.2f}", fontsize=9)
        axis.set_xlabel("step")
        axis.set_xlim(0, len(shares) - 1)
        axis.set_ylim(0, 1)
    axes[0].set_ylabel("share of router choices (layer 0)")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.suptitle(f"tokens per expert: E={EXPERTS}, top-{TOP_K}, capacity factor {CAPACITY_FACTOR} "
                    "(dotted: perfect balance)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("docs/images/expert_load.png"))
    arguments = parser.parse_args()
    runs = {}
    for label, weight in (("without the aux loss (alpha = 0)", 0.0), ("with the aux loss (alpha = 0.01)", 0.01)):
        runs[label] = train(weight, arguments.steps)
        shares, dropped, loss = runs[label]
        final = shares[-50:].mean(axis=0)
        print(f"{label}: final loss {loss:.3f}; last 50 steps: dropped {dropped[-50:].mean():.1%}, "
              f"shares {np.array2string(final, precision=3)}, largest/smallest {final.max() / final.min():.1f}")
    draw(runs, arguments.out)
    print(f"wrote {arguments.out}")


if __name__ == "__main__":
    main()
