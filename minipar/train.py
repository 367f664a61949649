"""One training loop for every layout: single process, dp, tp, pp, and all three at once.

A step, on each rank (see docs/design.md for the parts):

    global batch (B, T), the same on every rank for (seed, step)
      -> this data-parallel replica's rows (B/dp)          # rank discipline: nobody ships data
      -> m micro-batches of B/(dp m) rows
      -> pipeline executor: forward/backward of this rank's chunks, loss scaled by 1/m
      -> tensor-parallel gradient sums (sequence parallel only), tied-embedding sum (pp > 1)
      -> data-parallel average  Δθ = (1/dp) Σ_i Δθ_i
      -> clip by the global gradient norm, AdamW on this rank's shards: θ_j <- θ_j - η Δθ_j

With ZeRO (--zero 1|2|3, parallel/zero.py) the data-parallel average is a reduce-scatter
instead: each dp rank gets the average of its part only (during backward for stages 2-3), the
tensor-parallel and tied-embedding sums then run on the parts, the gradient norm also sums
over the dp group, AdamW updates the parts, and stages 1-2 all-gather the parameters after.

Rank discipline: every rank builds the same GPT from the same seed and keeps its slice;
every rank validates the configuration before any communication; world rank 0 prints,
evaluates (on the gathered single-process model) and writes files.
"""
import dataclasses
from dataclasses import dataclass

from minipar.backend import from_host, set_default_dtype, xp
from minipar.errors import CheckpointError, ConfigError
from minipar.nn.gpt import GPT
from minipar.optim import AdamW, clip_grad_norm, cosine_learning_rate, decay_groups
from minipar.parallel.sharding import label_replicated
from minipar.parallel.topology import Layout, ProcessGrid
from minipar.parallel.data_parallel import local_slice
from minipar.parallel.pipeline.executor import split_microbatches
from minipar.parallel.pipeline.partition import stage_parameters


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # global batch, in sequences, summed over data-parallel replicas
    learning_rate: float = 3e-3  # peak of the warmup + cosine schedule
    min_learning_rate: float = 3e-4  # where the cosine ends
    warmup_steps: int = 50  # linear warmup, which keeps early Adam steps small
    weight_decay: float = 0.0  # AdamW's decoupled decay on matrices; 0 learns the addition task fastest, GPT-2 used 0.1
    betas: tuple = (0.9, 0.99)  # Adam's moment decay rates
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 turns it off
    seed: int = 1337  # batches are drawn from (seed, step); the model from GPTConfig.seed
    dtype: str = "float32"  # float64 for exact comparisons between layouts
    # layout
    dp: int = 1  # data-parallel replicas
    tp: int = 1  # tensor-parallel ranks per layer
    pp: int = 1  # pipeline stages
    microbatches: int = 1  # per step and replica; gradients accumulate over them
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    split: tuple = None  # blocks per pipeline chunk; None balances them
    recompute: bool = False  # recompute activations in backward instead of stashing them
    sequence_parallel: bool = False  # shard LayerNorm/dropout regions along the sequence
    zero: int = 0  # ZeRO stage over the data-parallel group (0 = off)
    bucket_megabytes: float = 1.0  # data-parallel gradient bucket size
    overlap: bool = False  # start bucket allreduces during backward
    allreduce: str = "mpi"  # mpi | ring | recursive_doubling | tree

    def __post_init__(self):
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("steps", "batch_size", "dp", "tp", "pp", "microbatches", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "steps" else 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size % (self.dp * self.microbatches):
            raise ConfigError(f"global batch size {self.batch_size} must be divisible by dp x microbatches "
                              f"= {self.dp} x {self.microbatches} = {self.dp * self.microbatches}")
        if self.bucket_megabytes <= 0:
            raise ConfigError(f"bucket size must be > 0 MB, got {self.bucket_megabytes}")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ConfigError(f"virtual_stages = {self.virtual_stages} needs the interleaved schedule, "
                              f"not {self.schedule!r}")
        if self.schedule == "interleaved" and self.pp < 2:
            raise ConfigError("the interleaved schedule needs at least 2 pipeline stages (pp >= 2), got pp = 1")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero and self.dp > 1 and (self.overlap or self.allreduce != "mpi"):
            raise ConfigError("--overlap and --allreduce choose how plain data parallelism allreduces; "
                              "ZeRO reduce-scatters and all-gathers instead, so drop them or --zero")

    @property
    def layout(self):
        return Layout(self.dp, self.tp, self.pp)

    def to_dict(self):
        return dataclasses.asdict(self)


def learning_rate_at(config, step):
    return cosine_learning_rate(step, config.learning_rate, config.warmup_steps, config.steps,
                                config.min_learning_rate)


class Trainer:
    """Builds this rank's part of the model for the layout and runs training steps."""

    def __init__(self, model_config, train_config, world):
        """``world`` is a minipar Communicator over all ranks (its size must be dp*tp*pp)."""
        self.model_config, self.config = model_config, train_config
        set_default_dtype(getattr(xp, train_config.dtype))
        self.grid = ProcessGrid(train_config.layout, world)
        self.chunks = self._build_chunks()
        self.named_parameters = stage_parameters(self.chunks)  # each object once, by full name
        self.parameters = [p for _, p in self.named_parameters]
        groups = decay_groups(self.named_parameters, train_config.weight_decay)  # by ndim: before ZeRO-3 flattens
        self.zero = self._build_zero()  # before the executor: stage 3 wraps the pieces
        self.executor = self._build_executor()
        self.data_parallel = self._build_data_parallel() if self.zero is None else None
        self.optimizer = AdamW(self.zero.part_groups(groups) if self.zero is not None else groups,
                               lr=train_config.learning_rate, betas=train_config.betas,
                               weight_decay=train_config.weight_decay)
        if self.zero is not None:
            self.zero.optimizer = self.optimizer  # for its memory report
        self.step_count = 0

    # ---- construction ------------------------------------------------------------------
    def _build_chunks(self):
        config, grid = self.config, self.grid
        if config.tp > 1 or config.sequence_parallel:
            from minipar.parallel.tensor_parallel import tensor_parallel_pieces

            pieces = tensor_parallel_pieces(self.model_config, grid.tp, config.sequence_parallel)
        else:
            pieces = label_replicated(GPT(self.model_config)).pieces()  # every parameter gets its shard
        from minipar.parallel.pipeline.partition import partition

        return partition(pieces, config.pp, grid.pp_rank, config.virtual_stages, config.split)

    def _build_executor(self):
        from minipar.parallel.pipeline.executor import PipelineExecutor

        config = self.config
        micro_batch = config.batch_size // (config.dp * config.microbatches)
        length = self.model_config.block_size // (config.tp if config.sequence_parallel else 1)
        activation_shape = (micro_batch, length, self.model_config.n_embd)
        return PipelineExecutor(self.chunks, self.grid.pp, config.schedule, config.microbatches, activation_shape,
                                getattr(xp, config.dtype), recompute=config.recompute)

    def _build_zero(self):
        config = self.config
        if config.zero == 0:
            return None
        if config.dp == 1:
            if self.grid.world.rank == 0:
                print(f"note: --zero {config.zero} with dp = 1 has no effect: ZeRO shards over the "
                      f"data-parallel group, and a group of one has nothing to share", flush=True)
            return None
        from minipar.parallel.zero import Zero

        return Zero(self.chunks, self.grid.dp, config.zero, accumulation_steps=config.microbatches)

    def _build_data_parallel(self):
        if self.config.dp == 1:
            return None
        from minipar.parallel.data_parallel import DataParallel

        config = self.config
        # Broadcasts dp rank 0's parameters at construction, so replicas start identical.
        return DataParallel(self.parameters, self.grid.dp, bucket_bytes=int(config.bucket_megabytes * 2**20),
                            overlap=config.overlap, algorithm=config.allreduce,
                            accumulation_steps=config.microbatches)

    # ---- one step ----------------------------------------------------------------------
    def train_step(self, inputs, targets):
        """One optimizer step on the global batch (B, T); returns the mean loss on every rank."""
        config, grid = self.config, self.grid
        if inputs.shape[0] != config.batch_size:
            raise ConfigError(f"batch has {inputs.shape[0]} rows, the configuration says {config.batch_size}")
        inputs, targets = local_slice((inputs, targets), grid.dp_rank, config.dp)  # (B/dp, T)
        micro_inputs = split_microbatches(inputs, config.microbatches)  # m x (B/(dp m), T)
        micro_targets = split_microbatches(targets, config.microbatches)

        for p in self.parameters:
            p.grad = None
        if self.zero is not None:
            self.zero.start_step()
        loss = self.executor.run(micro_inputs, micro_targets)  # (B/dp m, T) per micro-batch
        self._finish_gradients()
        if config.grad_clip > 0:
            clip_grad_norm(self._updated, config.grad_clip, self._global_grad_norm_squared())
        self.optimizer.set_lr(learning_rate_at(config, self.step_count))
        self.optimizer.step()
        if self.zero is not None:
            self.zero.finish_step()  # stages 1-2: all-gather the updated parts
        elif self.data_parallel is not None:
            self.data_parallel.check_replicas(self.step_count)  # fails loudly if replicas ever diverge
        self.step_count += 1
        return self._share_loss(loss)

    @property
    def _updated(self):
        """What the optimizer updates: the parameters, or under ZeRO their parts (one per parameter)."""
        return self.zero.part_list if self.zero is not None else self.parameters

    def _finish_gradients(self):
        """The sums that turn local gradients into the single-process gradient.

        All three are linear, so their order does not change the result; the data-parallel
        average goes first because with overlap (or ZeRO 2-3) it was started during backward
        from the gradients as they were then, and must not see them change afterwards. Under
        ZeRO the other two sums act on the parts: p.grad is then p's part (parallel/zero.py).
        """
        if self.zero is not None:
            self.zero.finish_gradient_sync()
        elif self.data_parallel is not None:
            self.data_parallel.finish_gradient_sync()
        if self.config.sequence_parallel:
            from minipar.parallel.tensor_parallel import finish_tensor_parallel_gradients

            if self.zero is not None:
                self.zero.finish_tensor_parallel_gradients(self.grid.tp)
            else:
                finish_tensor_parallel_gradients(self.parameters, self.grid.tp)
        if self.config.pp > 1:
            from minipar.parallel.pipeline.partition import sum_tied_embedding_gradients

            sum_tied_embedding_gradients(self.chunks, self.grid.pp)
        for p in self._updated:  # a parameter no micro-batch touched has a zero gradient
            if p.grad is None:
                p.grad = xp.zeros_like(p.data)

    def _global_grad_norm_squared(self):
        """||g||^2 of the whole single-process model: each full parameter counted once.

        Sharded parameters: every tp rank adds its part. Replicated ones: tp rank 0 only.
        The tied embedding's copy in the head of a later stage: not again. Then sum over
        the tp and pp groups; data-parallel replicas already hold identical gradients,
        except under ZeRO, where each holds its own part: then sum over the dp group too.
        """
        total = 0.0
        for p in self._updated:
            if p.shard.is_replicated and self.grid.tp_rank != 0:
                continue
            if self._is_tied_copy(p):
                continue
            total += float((p.grad.astype(xp.float64) ** 2).sum())
        buffer = xp.array([total])
        self.grid.tp.allreduce(buffer)
        self.grid.pp.allreduce(buffer)
        if self.zero is not None:
            self.grid.dp.allreduce(buffer)
        return float(buffer[0])

    def _is_tied_copy(self, parameter):
        """True for the head's copy of the token embedding on a stage without the embedding."""
        return (parameter.shard.full_name == "embedding.token.weight" and self.config.pp > 1
                and not self.grid.is_first_stage)

    def _share_loss(self, loss):
        """The last stage knows the loss; average it over replicas and give it to every rank."""
        buffer = xp.array([loss if loss is not None else 0.0], dtype=xp.float64)
        self.grid.pp.broadcast(buffer, root=self.config.pp - 1)
        self.grid.dp.allreduce(buffer)
        return float(buffer[0]) / self.config.dp

    # ---- the single-process view -------------------------------------------------------
    def gather_state(self, arrays_by_parameter=None):
        """On world rank 0: {full name: full array} joined from every rank's shards; None elsewhere.

        ``arrays_by_parameter`` maps id(p) of a local parameter to an array shaped like p's
        tensor-parallel shard (optimizer moments, say); by default the parameters' values.
        Replica dp rank 0 sends. Collective: every rank calls it (ZeRO-3 first all-gathers).
        """
        from minipar.parallel.gather import gather_full_arrays

        if arrays_by_parameter is None:
            arrays_by_parameter = self._parameter_arrays_by_id()
        return gather_full_arrays(self.parameters, arrays_by_parameter, self.grid)

    # ---- this rank's arrays, for (distributed) checkpoints ------------------------------
    # Arrays have the shape of the parameter's tensor-parallel shard (p.shard.take of the full
    # array) under every ZeRO stage; under ZeRO the calls are collective over the dp group.
    def _parameter_arrays_by_id(self):
        if self.zero is not None:
            return self.zero.parameter_arrays()
        return {id(p): p.data.copy() for p in self.parameters}

    def parameter_arrays(self):
        """{full name: copy of this rank's tensor-parallel shard of the parameter}."""
        arrays = self._parameter_arrays_by_id()
        return {name: arrays[id(p)] for name, p in self.named_parameters}

    def load_parameter_arrays(self, arrays):
        """Set every local parameter from {full name: its tensor-parallel shard} (ZeRO keeps its part)."""
        self._check_shapes(arrays, "parameter")
        for name, p in self.named_parameters:
            value = xp.asarray(from_host(arrays[name]), dtype=p.dtype)
            if self.zero is not None:
                self.zero.load_parameter(p, value)
            else:
                p.data[...] = value

    def optimizer_state_arrays(self):
        """{full name: {"m": array, "v": array}}, AdamW's moments (zeros before the first step)."""
        if self.zero is not None:
            moments = self.zero.optimizer_state_arrays(self.optimizer)
        else:
            state = self.optimizer.state
            moments = {id(p): {slot: state[id(p)][slot].copy() if id(p) in state else xp.zeros_like(p.data)
                               for slot in ("m", "v")} for p in self.parameters}
        return {name: moments[id(p)] for name, p in self.named_parameters}

    def load_optimizer_state_arrays(self, states, step_count):
        """The reverse of ``optimizer_state_arrays``; ``step_count``: optimizer steps taken (AdamW's t)."""
        for slot in ("m", "v"):
            self._check_shapes({name: slots[slot] for name, slots in states.items() if slot in slots}, f"AdamW {slot}")
        for name, p in self.named_parameters:
            m, v = (xp.asarray(from_host(states[name][slot]), dtype=p.dtype) for slot in ("m", "v"))
            if self.zero is not None:
                self.zero.load_optimizer_state(self.optimizer, p, m, v)
            else:
                self.optimizer.state[id(p)] = {"m": m.copy(), "v": v.copy()}
        self.step_count = self.optimizer.step_count = step_count

    def _check_shapes(self, arrays, what):
        """Every local parameter present with its tensor-parallel shard's shape, or a CheckpointError."""
        for name, p in self.named_parameters:
            shape = self.zero.shape[id(p)] if self.zero is not None else p.shape
            if name not in arrays or tuple(arrays[name].shape) != tuple(shape):
                found = "nothing" if name not in arrays else f"shape {tuple(arrays[name].shape)}"
                raise CheckpointError(f"{what} {name!r}: rank {self.grid.world.rank} needs shape {tuple(shape)}, "
                                      f"got {found}")

    def memory_report(self):
        """Bytes this rank holds after a step: ``Zero.memory_report`` under ZeRO; otherwise the
        parameters, gradients and AdamW state, plus data parallelism's gradient buckets."""
        from minipar.parallel.zero import bytes_held

        if self.zero is not None:
            return self.zero.memory_report()
        state = self.optimizer.state.values()
        report = {"parameters": bytes_held(p.data for p in self.parameters),
                  "gradients": bytes_held(p.grad for p in self.parameters),
                  "optimizer_states": bytes_held(a for slots in state for a in slots.values())}
        report["total"] = sum(report.values())
        buckets = self.data_parallel.buckets if self.data_parallel is not None else []
        report["data_parallel_buckets"] = bytes_held(bucket.flat for bucket in buckets)
        return report
