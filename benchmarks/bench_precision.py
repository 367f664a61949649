"""What 16-bit emulation costs on NumPy: a training step in bf16 and fp16 against fp32, as ratios.

    python benchmarks/bench_precision.py [--steps 3] [--rounds 5]

One process, the README's model on the addition task (batch 64, 4 layers, C = 128). The three
precisions take turns, ``steps`` steps each per round, so a shared machine slows them alike; the
median over rounds of each precision's time per step divided by fp32's is printed. On NumPy the
arithmetic is fp32 in every case (docs/mixed_precision.md), so the ratio is the price of rounding
every op's output and gradient (and, with fp16, of unscaling and the overflow check).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per precision and round")
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()

    from minipar.comm import Communicator
    from minipar.data import addition_dataset
    from minipar.nn.gpt import GPTConfig
    from minipar.train import TrainConfig, Trainer

    dataset = addition_dataset()
    model_config = GPTConfig(vocab_size=16, block_size=10)
    trainers, seconds, step = {}, {}, 0
    for precision in ("fp32", "bf16", "fp16"):
        config = TrainConfig(precision=precision)
        trainers[precision] = config, Trainer(model_config, config, Communicator())
        seconds[precision] = []
    for _ in range(arguments.rounds):
        for precision, (config, trainer) in trainers.items():
            batches = [dataset.get_batch("train", config.batch_size, 10, config.seed, step + i)
                       for i in range(arguments.steps)]
            start = time.perf_counter()
            for inputs, targets in batches:
                trainer.train_step(inputs, targets)
            seconds[precision].append((time.perf_counter() - start) / arguments.steps)
        step += arguments.steps
    for precision in ("bf16", "fp16"):
        ratios = [a / b for a, b in zip(seconds[precision], seconds["fp32"], strict=True)]
        print(f"{precision}: {statistics.median(ratios):.2f} x fp32's time per step (median of {arguments.rounds} "
              f"rounds; fp32 median {statistics.median(seconds['fp32']) * 1e3:.0f} ms per step)")


if __name__ == "__main__":
    main()
