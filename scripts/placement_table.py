"""Print the placement of every parameter of the GPT on every axis of a layout, read from the Trainer.

    mpiexec -n 8 python scripts/placement_table.py --dp 2 --tp 2 --pp 2 --sequence-parallel
    mpiexec -n 8 python scripts/placement_table.py --dp 2 --tp 2 --pp 2 --sequence-parallel --zero 1
    python scripts/placement_table.py --sequence-parallel          # one process: the tp placements still show

Every rank builds its part of a small GPT with ``minipar.train.Trainer`` (nothing is trained) and
lists, for each parameter it holds, what the optimizer updates and its placements
(``minipar.parallel.placement_table``); rank 0 merges the lists and prints a Markdown table. The
shapes are in the model's symbols (C, 3C, 4C, V, T), so the table holds for any size of model.
"""
import argparse

from minipar.job import start_process


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for axis in ("dp", "tp", "pp", "cp", "ep"):
        parser.add_argument(f"--{axis}", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--experts", type=int, default=0, help="experts per block (0: the dense MLP)")
    return parser.parse_args()


def main():
    start_process()  # the process-wide settings and the Ctrl-C watcher (minipar/job.py)
    arguments = parse_arguments()
    from minipar.comm import Communicator
    from minipar.nn.gpt import GPTConfig
    from minipar.parallel.mesh import AXES
    from minipar.parallel.placement_table import markdown_table, merge_rows, placement_rows, shape_symbols
    from minipar.train import TrainConfig, Trainer

    layout = {axis: getattr(arguments, axis) for axis in ("dp", "tp", "pp", "cp", "ep")}
    # Sizes chosen so that C, 3C, 4C, V and T are five different numbers, divisible as the layouts need.
    model_config = GPTConfig(vocab_size=20, block_size=16, n_layer=2 * layout["pp"], n_head=4, n_embd=32,
                             n_experts=arguments.experts)
    train_config = TrainConfig(steps=1, batch_size=8 * layout["dp"] * layout["ep"], microbatches=2,
                               sequence_parallel=arguments.sequence_parallel, zero=arguments.zero, **layout)
    world = Communicator()
    trainer = Trainer(model_config, train_config, world)
    axes = [axis for axis in AXES if layout[axis] > 1 or axis == "tp"]
    rows = placement_rows(trainer.named_parameters, trainer.sync.updated_tensor, axes, shape_symbols(model_config))
    everyone = world.mpi.gather(rows, root=0)  # small metadata: names and placements, pickled once
    if world.rank == 0:
        layout_text = " x ".join(f"{axis} {layout[axis]}" for axis in AXES if layout[axis] > 1) or "one process"
        extras = [", sequence parallelism"] if arguments.sequence_parallel else []
        extras += [f", ZeRO-{arguments.zero}"] if arguments.zero else []
        print(f"Placements of the GPT under {layout_text}{''.join(extras)} "
              f"(C = n_embd, V = vocab_size, T = block_size; an axis not shown: Replicate())\n")
        print(markdown_table(merge_rows(everyone), axes))


if __name__ == "__main__":
    main()
