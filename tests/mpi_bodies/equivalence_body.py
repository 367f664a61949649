"""Body of tests/test_equivalence.py: every layout of the Trainer equals one plain process.

The reference is written here, independently of minipar.train: a GPT, AdamW with the same
hyperparameters, the same clipping and learning-rate schedule, one backward per step on
the whole global batch. Each parallel layout then trains k steps on the same batches,
gathers its shards back into full arrays on rank 0, and must match in float64.

The process's default float type stays float32 throughout: the Trainer is asked for float64
through its TrainConfig and the reference through ``GPT(..., dtype="float64")``, so anything
in the Trainer that fell back on the default (or changed it) would show as a float32-sized
difference, and each case reports the default it finds after the Trainer was built.
"""
import numpy as np

from minipar.backend import default_dtype, set_default_dtype, xp
from minipar.comm import Communicator
from minipar.nn.gpt import GPT, GPTConfig
from minipar.optim import AdamW, clip_grad_norm, decay_groups
from minipar.train import TrainConfig, Trainer, learning_rate_at

MODEL = dict(vocab_size=16, block_size=8, n_layer=8, n_head=8, n_embd=32)
STEPS = 3


def batches(config, model_config, steps):
    rng = np.random.default_rng(7)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, model_config.vocab_size, (config.batch_size, model_config.block_size + 1))
        out.append((xp.asarray(ids[:, :-1]), xp.asarray(ids[:, 1:])))
    return out


# The reference depends on the model, the batches and these settings, not on the layout.
_REFERENCE_RUNS, _REFERENCE_FIELDS = {}, ("batch_size", "learning_rate", "min_learning_rate", "warmup_steps",
                                          "steps", "weight_decay", "betas", "grad_clip")


def routing_groups(model_config, config):
    """A mixture of experts counts capacity and its balance loss per group of tokens (nn/moe.py): in
    a layout, each data rank's micro-batch is one group (dp·ep·m of them, in row order); one process
    equals it when it cuts its batch into as many groups."""
    return config.dp * config.ep * config.microbatches if model_config.n_experts else 1


def single_process_run(model_config, config, data):
    groups = routing_groups(model_config, config)
    key = (repr(model_config), len(data), groups, *(getattr(config, name) for name in _REFERENCE_FIELDS))
    if key not in _REFERENCE_RUNS:
        _REFERENCE_RUNS[key] = _single_process_run(model_config, config, data, groups)
    return _REFERENCE_RUNS[key]


def _single_process_run(model_config, config, data, groups=1):
    model = GPT(model_config, dtype=config.dtype)
    for block in model.blocks:
        if model_config.n_experts:
            block.mlp.groups = groups
    optimizer = AdamW(decay_groups(model.named_parameters(), config.weight_decay), lr=config.learning_rate,
                      betas=config.betas, weight_decay=config.weight_decay)
    losses = []
    for step, (inputs, targets) in enumerate(data):
        model.zero_grad()
        loss = model(inputs, targets)[1]
        loss.backward()
        clip_grad_norm(model.parameters(), config.grad_clip)
        optimizer.set_lr(learning_rate_at(config, step))
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()


# Parameters whose exact gradient is 0 (the key bias: softmax ignores a constant shift) move by
# AdamW-amplified rounding noise of ~1e-12; everything else must agree to 1e-10, elementwise:
# |got - expected| <= PARAMETER_ATOL + PARAMETER_RTOL |expected|.
PARAMETER_RTOL, PARAMETER_ATOL = 1e-10, 1e-11


def compare_states(state, reference_state):
    """Per parameter: the largest |got - expected| and the largest ratio of it to its tolerance
    (at most 1 passes), for pytest to judge."""
    error, ratio = {}, {}
    for name, expected in reference_state.items():
        if name in state:
            difference = np.abs(state[name] - expected)
            error[name] = float(difference.max())
            ratio[name] = float((difference / (PARAMETER_ATOL + PARAMETER_RTOL * np.abs(expected))).max())
    return {"names": sorted(state), "reference_names": sorted(reference_state),
            "parameter_error": error, "parameter_tolerance_ratio": ratio}


def dtypes(trainer):
    return {"parameter_dtypes": sorted({p.dtype.name for p in trainer.parameters}),
            "default_dtype_after": xp.dtype(default_dtype()).name}


def check_layouts(comm, cases, grad_clip=1.0):
    """cases: a list of TrainConfig keyword dicts (the layout and its options) for this world size;
    a case may also give "model": GPTConfig fields that replace those of MODEL. Rank 0 reports,
    per case, the losses of every rank and of one process, and ``compare_states`` of the trained
    parameters against one process's (other ranks return an empty list)."""
    set_default_dtype(xp.float32)  # the Trainer must not need (or change) the default: see above
    world = Communicator(comm)
    reported = []
    for case in cases:
        options = dict(case)
        model_config = GPTConfig(**{**MODEL, **options.pop("model", {})})
        options.setdefault("weight_decay", 0.1)  # exercise the decoupled decay, not only the Adam update
        config = TrainConfig(steps=STEPS, batch_size=options.pop("batch_size", 16), dtype="float64", warmup_steps=1,
                             learning_rate=1e-2, grad_clip=grad_clip, **options)
        data = batches(config, model_config, STEPS)
        trainer = Trainer(model_config, config, world)
        losses = [trainer.train_step(inputs, targets) for inputs, targets in data]
        state = trainer.gather_state()
        losses_by_rank = comm.gather(losses, root=0)  # every rank's, whatever its stage (small metadata)
        if world.rank == 0:
            reference_losses, reference_state = single_process_run(model_config, config, data)
            reported.append({"case": case, "losses_by_rank": losses_by_rank, "reference_losses": reference_losses,
                             **compare_states(state, reference_state), **dtypes(trainer)})
    return reported


def check_gradients(comm, cases):
    """Right after the gradient sums, before clipping and AdamW (whose normalisation would hide a
    gradient scaled by a constant, a missing 1/m say): each layout's gradients and global gradient
    norm against one process's on the same batch. Reports, per case, the norm both ways and, per
    parameter, the largest difference and the largest reference value (rank 0; others: [])."""
    set_default_dtype(xp.float32)  # the Trainer must not need (or change) the default: see above
    world = Communicator(comm)
    reported = []
    for case in cases:
        options = dict(case)
        model_config = GPTConfig(**{**MODEL, **options.pop("model", {})})
        config = TrainConfig(steps=STEPS, batch_size=options.pop("batch_size", 16), dtype="float64", **options)
        inputs, targets = batches(config, model_config, 1)[0]
        trainer = Trainer(model_config, config, world)
        loss = trainer.compute_gradients(inputs, targets)
        norm_squared = trainer.grad_norm_squared()
        gradients = trainer.gather_state(trainer.sync_state.gradient_arrays())
        if world.rank == 0:
            model = GPT(model_config, dtype=config.dtype)
            for block in model.blocks:
                if model_config.n_experts:
                    block.mlp.groups = routing_groups(model_config, config)
            reference_loss = model(inputs, targets)[1]
            reference_loss.backward()
            reference = dict(model.named_parameters())
            reported.append({"case": case, **dtypes(trainer), "loss": loss, "reference_loss": reference_loss.item(),
                           "norm_squared": norm_squared,
                           "reference_norm_squared": sum(float((p.grad ** 2).sum()) for p in reference.values()),
                           "names": sorted(gradients), "reference_names": sorted(reference),
                           "gradient_error": {name: float(np.abs(gradients[name] - p.grad).max())
                                              for name, p in reference.items() if name in gradients},
                           "gradient_scale": {name: float(np.abs(p.grad).max()) for name, p in reference.items()}})
    return reported
