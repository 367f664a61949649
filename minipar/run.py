"""What ``python -m minipar train`` and ``sample`` do, step by step.

train: data -> GPTConfig + TrainConfig (validated on every rank) -> Trainer for the layout
       -> steps with a progress bar on rank 0 -> every eval_interval steps, rank 0 evaluates
       the gathered single-process model (validation loss; answer accuracy on the addition
       task) -> a distributed checkpoint (a folder: each rank writes its own shards, rank 0
       an index; see docs/checkpoints.md), which any layout can resume from (--resume).
sample: the checkpoint loaded into one process (one more layout) -> generate.
"""
import math
import os

from minipar.backend import to_host, xp
from minipar.data import CharTokenizer, addition_dataset, answer_accuracy, load_text_dataset
from minipar.errors import CheckpointError, ConfigError, DataError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.parallel.distributed_checkpoint import (load_distributed_checkpoint, load_single_process_model,
                                                     save_distributed_checkpoint)
from minipar.tensor import no_grad

CHECKPOINT_NAME = "ckpt.minipar"  # a folder inside --out


def build_configs(arguments, vocabulary_size):
    from minipar.train import TrainConfig

    multiple = arguments.vocab_multiple
    if multiple < 1:
        raise ConfigError(f"--vocab-multiple must be at least 1, got {multiple}")
    model_config = GPTConfig(vocab_size=math.ceil(vocabulary_size / multiple) * multiple,
                             block_size=arguments.block_size, n_layer=arguments.n_layer, n_head=arguments.n_head,
                             n_embd=arguments.n_embd, dropout=arguments.dropout, seed=arguments.model_seed)
    split = tuple(int(n) for n in arguments.split.split(",")) if arguments.split else None
    train_config = TrainConfig(
        steps=arguments.steps, batch_size=arguments.batch_size, learning_rate=arguments.lr,
        min_learning_rate=arguments.min_lr, warmup_steps=arguments.warmup, weight_decay=arguments.weight_decay,
        grad_clip=arguments.grad_clip, seed=arguments.seed, dtype=arguments.dtype, dp=arguments.dp, tp=arguments.tp,
        pp=arguments.pp, microbatches=arguments.microbatches, schedule=arguments.schedule,
        virtual_stages=arguments.virtual_stages, split=split, recompute=arguments.recompute,
        sequence_parallel=arguments.sequence_parallel, zero=arguments.zero, bucket_megabytes=arguments.bucket_mb,
        overlap=arguments.overlap, allreduce=arguments.allreduce)
    return model_config, train_config


def evaluate(model, dataset, config, eval_batches, accuracy_problems=200):
    """Validation loss (and answer accuracy on the addition task) of a single-process model."""
    model.eval()
    with no_grad():
        losses = [model(x, y)[1].item()
                  for x, y in dataset.validation_batches(config.batch_size, model.config.block_size, eval_batches)]
        report = {"validation_loss": sum(losses) / len(losses)}
        if dataset.validation_problems:
            def greedy(prompts, new_tokens):
                return model.generate(prompts, new_tokens, greedy=True, num_tokens=dataset.tokenizer.vocab_size)

            accuracy = answer_accuracy(greedy, dataset.validation_problems[:accuracy_problems], dataset.tokenizer)
            report["answer_accuracy"] = accuracy.exact_match
            report["digit_accuracy"] = accuracy.character_accuracy
    model.train()
    return report


def train_command(arguments):
    """``python -m minipar train``: the CLI around ``minipar.train.Trainer`` (module docstring)."""
    from minipar.comm.communicator import Communicator
    from minipar.train import Trainer

    world = Communicator()
    is_printer = world.rank == 0
    dataset = (load_text_dataset(arguments.data, arguments.block_size) if arguments.data
               else addition_dataset(digits=arguments.digits))
    model_config, train_config = build_configs(arguments, dataset.tokenizer.vocab_size)
    trainer = Trainer(model_config, train_config, world)  # validates the layout on every rank first
    start_step = resume(trainer, arguments.resume) if arguments.resume else 0
    total = trainer.num_parameters()  # collective
    if is_printer:
        print(f"data: {dataset.name}")
        print(f"model: {model_config}")
        print(f"layout: dp {train_config.dp} x tp {train_config.tp} x pp {train_config.pp} on {world.size} ranks, "
              f"{total:,} parameters in the model")
    progress = _progress_bar(range(start_step, train_config.steps), enabled=is_printer)
    history = []
    for step in progress:
        inputs, targets = dataset.get_batch("train", train_config.batch_size, model_config.block_size,
                                            train_config.seed, step)
        loss = trainer.train_step(inputs, targets)
        history.append(loss)
        if is_printer:
            progress.set_postfix(loss=f"{loss:.4f}")
        last = step == train_config.steps - 1
        if (step + 1) % arguments.eval_interval == 0 or last:
            state = trainer.gather_state()
            if is_printer:
                model = GPT(model_config, initialise=False)
                model.load_state_dict(state)
                report = evaluate(model, dataset, train_config, arguments.eval_batches)
                progress.write(f"step {step + 1}: train loss {loss:.4f}, "
                               + ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in report.items()))
    save(trainer, dataset, arguments.out, model_config, train_config)
    return 0


def _progress_bar(steps, enabled):
    from tqdm.auto import tqdm

    return tqdm(steps, disable=not enabled, dynamic_ncols=True, desc="train")


def save(trainer, dataset, folder, model_config, train_config):
    """Every rank writes its own shards into ``folder/ckpt.minipar``; rank 0 writes the index and reports."""
    path = os.path.join(folder, CHECKPOINT_NAME)
    save_distributed_checkpoint(path, trainer, tokenizer=dataset.tokenizer.to_dict())
    if trainer.grid.world.rank == 0:
        print(f"checkpoint written to {path} (step {trainer.step_count})")


def resume(trainer, path):
    """Load a checkpoint saved under any layout into this one; returns the step to continue from."""
    return load_distributed_checkpoint(path, trainer)["step"]


def sample(arguments):
    model, index = load_single_process_model(arguments.checkpoint)
    try:
        tokenizer = CharTokenizer.from_dict(index["tokenizer"])
    except DataError as error:
        raise CheckpointError(f"checkpoint {arguments.checkpoint!r} has no usable tokenizer: {error}") from None
    prompt = xp.asarray(tokenizer.encode(arguments.prompt), dtype=xp.int64)[None, :]
    out = model.generate(prompt, arguments.tokens, temperature=arguments.temperature, seed=arguments.seed,
                         num_tokens=tokenizer.vocab_size,
                         greedy=arguments.greedy)
    print(tokenizer.decode(to_host(out[0])))
    return 0
