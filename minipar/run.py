"""What ``python -m minipar train`` and ``sample`` do, step by step.

train: check_train, on every rank and without communication: the layout against the rank count,
       the data, GPTConfig + TrainConfig, the checkpoint to resume (its schedule: steps, warmup,
       learning rates, continue unless given again), --out writable; then the ranks agree
       (minipar.job.agree, one allgather) -> Trainer for the layout -> steps with a progress bar
       on rank 0; a non-finite loss stops every rank (nothing saved) -> every eval_interval steps,
       rank 0 evaluates the gathered single-process model (validation loss; answer accuracy on
       the addition task) -> every save_every steps and at the end a distributed checkpoint (a
       folder: each rank writes its own shards, rank 0 an index with the loss history; see
       docs/checkpoints.md), which any layout can resume from (--resume).
sample: the checkpoint loaded into one process (one more layout) -> generate.

The configurations from the command line (``build_configs``, the run's schedule, the flags named in
messages) are in cli_config.py; ``addition_steps`` and ``flags_in_messages`` are offered here too.
"""
import math
import os
from dataclasses import dataclass

from minipar.backend import to_host, xp
from minipar.cli_config import addition_steps, build_configs, flags_in_messages, run_schedule  # noqa: F401  (re-exported)
from minipar.data import CharTokenizer, addition_dataset, answer_accuracy, load_text_dataset
from minipar.errors import CheckpointError, ConfigError, DataError, JobError
from minipar.job import on_every_rank, record_ranks
from minipar.nn.gpt import GPT
from minipar.parallel.checkpoint_index import check_model_matches
from minipar.parallel.distributed_checkpoint import (
    load_distributed_checkpoint,
    load_single_process_model,
    save_distributed_checkpoint,
)
from minipar.tensor import no_grad
from minipar.train_config import learning_rate_at

CHECKPOINT_NAME = "ckpt.minipar"  # a folder inside --out


@dataclass
class TrainPlan:
    """What ``train`` will do, checked on every rank before any communication (``check_train``)."""
    arguments: object
    dataset: object
    model_config: object
    train_config: object
    start_step: int
    stop_step: int
    save_every: int
    history: list
    notes: list


def check_train(arguments, world_size):
    """Every check ``train`` needs, on this rank, local work only: ``(TrainPlan, fingerprint)``."""
    from minipar.parallel.checkpoint_index import read_index_here
    from minipar.parallel.mesh import MeshShape

    # the rank count first: the likeliest slip
    MeshShape.of(dp=arguments.dp, tp=arguments.tp, pp=arguments.pp, ep=arguments.ep, cp=arguments.cp).check_world(
        world_size)
    if arguments.block_size is None:
        # An addition line is "ab+cd=" plus the reversed sum and a newline: 3 digits + 4 characters.
        arguments.block_size = 64 if arguments.data else 3 * arguments.digits + 4
    dataset = (load_text_dataset(arguments.data, arguments.block_size) if arguments.data
               else addition_dataset(digits=arguments.digits))
    index = read_index_here(arguments.resume, None) if arguments.resume else None
    schedule, notes = run_schedule(arguments, index)
    model_config, train_config = build_configs(arguments, dataset.tokenizer.vocab_size, schedule)
    train_config.check_model(model_config)
    start_step, history = 0, []
    if index is not None:
        check_model_matches(index, model_config)  # raises CheckpointError naming the difference
        check_same_tokenizer(index, dataset.tokenizer, arguments)
        start_step = index["step"]
        history = list(index.get("history", {}).get("train_loss", []))[:start_step]
        if start_step >= train_config.steps:
            raise ConfigError(f"checkpoint {arguments.resume!r} is at step {start_step}, and this run ends at step "
                              f"{train_config.steps}: nothing left to train; pass --steps N with N > {start_step} "
                              "to train on (the cosine schedule then ends at N)")
    stop_step = min(arguments.stop_after or train_config.steps, train_config.steps)
    if stop_step <= start_step:
        raise ConfigError(f"--stop-after {arguments.stop_after} is not after the checkpoint's step {start_step}")
    save_every = arguments.save_every
    if save_every is None:  # the default: runs longer than this lose at most this many steps to a crash
        save_every = DEFAULT_SAVE_EVERY if train_config.steps > DEFAULT_SAVE_EVERY else 0
    check_writable(arguments.out)
    plan = TrainPlan(arguments, dataset, model_config, train_config, start_step, stop_step, save_every, history, notes)
    return plan, (model_config.to_dict(), train_config.to_dict(), dataset_fingerprint(dataset), start_step)


DEFAULT_SAVE_EVERY = 500


def check_same_tokenizer(index, tokenizer, arguments):
    """Refuse to resume on data whose character -> id table differs from the checkpoint's (unless
    --allow-new-data): the same vocabulary size would resume silently with every id meaning another character."""
    saved = index.get("tokenizer")
    if saved == tokenizer.to_dict() or arguments.allow_new_data:
        return
    characters = saved.get("characters") if isinstance(saved, dict) else None
    described = (f"{len(characters)} characters {characters!r}" if isinstance(characters, str)
                 else "no character table")
    raise DataError(f"--resume {arguments.resume}: the checkpoint was trained on {described}, this data has "
                    f"{tokenizer.vocab_size} characters {tokenizer.characters!r}, so token ids would mean other "
                    "characters; pass --allow-new-data to resume on it anyway")


def dataset_fingerprint(dataset):
    """A hash of the tokens: ranks started with different data files differ here."""
    import hashlib

    digest = hashlib.sha256()
    for split in ("train", "validation"):
        digest.update(to_host(dataset.tokens[split]).tobytes())
    return digest.hexdigest()[:16]


def check_writable(folder):
    """Create ``folder`` if needed and write (then delete) a file in it: a full or read-only disk shows now,
    not after training."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".minipar-write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"--out {folder!r} is not a writable folder: {error.strerror or error}") from None


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


def train_command(plan):
    """``python -m minipar train``: the CLI around ``minipar.train.Trainer``, as ``plan`` (from ``check_train``)
    says; every rank. Returns 0, or raises a JobError on every rank if the loss stops being finite."""
    from minipar.comm.communicator import Communicator
    from minipar.comm.transport import describe, device_placement
    from minipar.train import Trainer

    arguments, dataset, model_config, train_config = plan.arguments, plan.dataset, plan.model_config, plan.train_config
    world = Communicator()
    placement = device_placement(world.mpi)  # the GPU each rank took at start-up (__main__), to report
    is_printer = world.rank == 0
    record_ranks(world.mpi, os.path.join(arguments.out, "ranks.json"))  # rank -> PID: a killed rank is named by it
    trainer = Trainer(model_config, train_config, world)
    if arguments.resume:
        resume(trainer, arguments.resume)
    total = trainer.num_parameters()  # collective
    if is_printer:
        print(describe(world.transport, placement))
        print(f"data: {dataset.name}")
        print(f"model: {model_config}")
        extra = "".join(f" x {axis} {getattr(train_config, axis)}" for axis in ("ep", "cp")
                        if getattr(train_config, axis) > 1)
        print(f"layout: dp {train_config.dp} x tp {train_config.tp} x pp {train_config.pp}{extra} on {world.size} ranks, "
              f"{total:,} parameters in the model"
              + (f", {train_config.precision} on fp32 master weights" if train_config.precision != "fp32" else ""))
        for note in plan.notes:
            print(f"note: {note}")
        if plan.start_step:
            print(f"resuming at step {plan.start_step} of {train_config.steps} from {arguments.resume}")
    history = list(plan.history)
    progress = _progress_bar(range(plan.start_step, plan.stop_step), enabled=is_printer)
    for step in progress:
        inputs, targets = dataset.get_batch("train", train_config.batch_size, model_config.block_size,
                                            train_config.seed, step)
        loss = trainer.train_step(inputs, targets)
        if not math.isfinite(loss):  # the same value on every rank (Trainer._share_loss): all stop together
            raise on_every_rank(JobError(
                f"the training loss is {loss} at step {step + 1} (learning rate {learning_rate_at(train_config, step):.3g}); "
                f"stopping without saving; the last good checkpoint, if any, is in {arguments.out!r}"))
        history.append(loss)
        if is_printer:
            progress.set_postfix(loss=f"{loss:.4f}")
        last = step + 1 == plan.stop_step
        if (step + 1) % arguments.eval_interval == 0 or last:
            _report(trainer, dataset, model_config, train_config, arguments, step, loss, progress, final=last)
        if last or (plan.save_every and (step + 1) % plan.save_every == 0):
            save(trainer, dataset, arguments.out, history, keep=arguments.keep, say=progress.write)
    return 0


def _report(trainer, dataset, model_config, train_config, arguments, step, loss, progress, final):
    """Evaluate the gathered single-process model on rank 0 (collective: every rank calls it)."""
    state = trainer.gather_state()
    if trainer.grid.world.rank == 0:
        model = GPT(model_config, initialise=False, dtype=train_config.dtype)
        model.load_state_dict(state)
        # The last report scores every held-out problem; the ones along the way a sample of 200.
        problems = len(dataset.validation_problems or []) if final else 200
        report = evaluate(model, dataset, train_config, arguments.eval_batches, accuracy_problems=problems)
        scaling = trainer.precision.scaler  # fp16: where the loss scale is (docs/mixed_precision.md)
        progress.write(f"step {step + 1}: train loss {loss:.4f}, "
                       + ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in report.items())
                       + (f", loss scale {trainer.precision.scale:g} ({trainer.precision.skipped_steps} steps "
                          f"skipped)" if scaling else ""))


def _progress_bar(steps, enabled):
    """A tqdm bar on the printing rank. The others get the bare steps and never import tqdm (with
    asyncio under it): 0.05-0.09 CPU-seconds of start-up saved on each rank that prints nothing."""
    if not enabled:
        return _NoProgressBar(steps)
    from tqdm.auto import tqdm

    return tqdm(steps, dynamic_ncols=True, desc="train")


class _NoProgressBar:
    """The steps of a rank that shows no progress; ``write`` prints, as tqdm's does."""

    def __init__(self, steps):
        self.steps = steps

    def __iter__(self):
        return iter(self.steps)

    def write(self, text):
        print(text)


def save(trainer, dataset, folder, history, keep=1, say=print):
    """Every rank writes its own shards into ``folder/ckpt.minipar``; rank 0 writes the index and reports.

    The index also carries the loss history, so a resumed run continues it."""
    path = os.path.join(folder, CHECKPOINT_NAME)
    save_distributed_checkpoint(path, trainer, tokenizer=dataset.tokenizer.to_dict(),
                                extra={"history": {"train_loss": list(history)}}, keep=keep)
    if trainer.grid.world.rank == 0:
        say(f"checkpoint written to {path} (step {trainer.step_count})")


def resume(trainer, path):
    """Load a checkpoint saved under any layout into this one; returns the step to continue from."""
    return load_distributed_checkpoint(path, trainer)["step"]


def check_sample(arguments, world_size):
    """``sample``'s checks, before anything is loaded: ``(arguments, None)``."""
    if not arguments.prompt:
        raise ConfigError("--prompt must hold at least one character (the model continues it)")
    if not arguments.greedy and arguments.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0 (or use --greedy), got {arguments.temperature}")
    if world_size > 1:
        raise ConfigError("sample runs in one process; start it without mpiexec")
    return arguments, None


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
