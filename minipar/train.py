"""One training loop for every layout: single process, dp, tp, pp, and all three at once.

A step, on each rank (see docs/design.md for the parts):

    global batch (B, T), the same on every rank for (seed, step)
      -> this data-parallel replica's rows (B/dp)          # rank discipline: nobody ships data
      -> m micro-batches of B/(dp m) rows
      -> pipeline executor: forward/backward of this rank's chunks, loss scaled by 1/m
      -> data-parallel average  Δθ = (1/dp) Σ_i Δθ_i
      -> every other partial gradient summed over its axis: sequence parallelism's over tp, the
         tied embedding's between the first and last stage (placements: parallel/placement.py)
      -> clip by the global gradient norm, AdamW on this rank's shards: θ_j <- θ_j - η Δθ_j

The data-parallel average is one of three objects with one interface (parallel/gradient_sync.py):
SingleReplica (dp = 1), DataParallel (allreduce) or Zero (--zero 1|2|3, parallel/zero.py: a
reduce-scatter, each dp rank getting the average of its part only). What the optimizer updates
is ``sync.updated``: the parameters, or under ZeRO their parts. Each records its placement on every
axis of the device mesh (parallel/mesh.py); the other sums and the norm's counting follow from them.

The configuration, ``TrainConfig`` (a reason per field), and the learning-rate schedule live in
train_config.py; both names are offered here too.

Rank discipline: every rank builds the same GPT from the same seed and keeps its slice;
every rank validates the configuration before any communication; world rank 0 prints,
evaluates (on the gathered single-process model) and writes files.
"""
from minipar.backend import from_host, scalar_to_host, xp
from minipar.comm.compression import make_compressor
from minipar.comm.hierarchical import NodeGroups, node_of_world_rank, shared_memory_node
from minipar.data import check_token_ids
from minipar.errors import CheckpointError, ConfigError
from minipar.job import guard_job
from minipar.mixed_precision import MixedPrecision
from minipar.nn.gpt import GPT
from minipar.optim import SGD, AdamW, clip_grad_norm, decay_groups, grad_norm_squared
from minipar.parallel import axes
from minipar.parallel.communication_reduction import CompressedDataParallel, HierarchicalDataParallel, LocalSGD
from minipar.parallel.data_parallel import DataParallel
from minipar.parallel.gather import gather_full_arrays
from minipar.parallel.gradient_sync import MOMENTS, SingleReplica
from minipar.parallel.mesh import AXES, DeviceMesh
from minipar.parallel.pipeline.executor import PipelineExecutor, split_microbatches
from minipar.parallel.pipeline.partition import TIED_EMBEDDING, partition, stage_parameters
from minipar.parallel.pipeline.schedules import chunks_per_stage, placement_of
from minipar.parallel.placement import Partial, PartialGradientSum, Shard, agreed_norm_axes, counts_in_model_sum, place
from minipar.parallel.sharding import label_replicated
from minipar.parallel.tensor_parallel import tensor_parallel_pieces
from minipar.parallel.zero import Zero
from minipar.train_config import TrainConfig, learning_rate_at  # noqa: F401  (TrainConfig re-exported: minipar.train.TrainConfig)


class Trainer:
    """Builds this rank's part of the model for the layout and runs training steps."""

    def __init__(self, model_config, train_config, world):
        """``world`` is a minipar Communicator over all ranks (its size must be dp*tp*pp)."""
        self.model_config, self.config = model_config, train_config
        train_config.check_model(model_config)
        guard_job(world.mpi)  # an uncaught exception or Ctrl-C on any rank ends every rank (minipar/job.py)
        self.grid = DeviceMesh(train_config.mesh_shape, world)  # checks the rank count, then groups per axis
        self.chunks = self._build_chunks()
        self.named_parameters = stage_parameters(self.chunks)  # each object once, by full name
        self.parameters = [p for _, p in self.named_parameters]
        self.executor = self._build_executor()
        self.sync = self._build_gradient_sync()  # the data-parallel average: none, allreduce or ZeRO
        self.sync_state = self.sync.state  # its arrays, for checkpoints and memory reports
        for chunk in self.chunks:
            chunk.piece_runner = self.sync.piece_runner  # ZeRO-3 gathers each piece's parameters around it
        updated = [self._place(name, p) for name, p in self.named_parameters]  # placements: parallel/placement.py
        # The partial gradients: dp's average by the sync (bucketed, maybe overlapped), every other
        # axis's sums from the placements. Linear, so their order does not matter; the dp average goes
        # first because with overlap (or ZeRO 2-3) it started during backward.
        self.partial_gradients = PartialGradientSum(updated, self.grid, [axis for axis in AXES if axis != "dp"])
        self.precision = MixedPrecision(train_config.precision, self.sync, self.executor, world)  # fp32 masters
        self.sync_state = self.precision.state_view(self.sync_state)  # checkpoints: masters; memory: formats
        self.gradient_sums = [self.sync, self.partial_gradients, self.precision]  # the last: 16-bit gradients
        summed = agreed_norm_axes(updated, self.grid)  # ||g||^2 sums over the axes that shard something
        self.norm_tensors = [t for t in updated if counts_in_model_sum(t, self.grid, summed)]
        self.norm_groups = [self.grid.group(axis) for axis in summed]
        groups = decay_groups(self.named_parameters, train_config.weight_decay)
        if train_config.optimizer == "sgd":
            self.optimizer = SGD(self.sync.optimizer_groups(groups), lr=train_config.learning_rate)
        else:
            self.optimizer = AdamW(self.sync.optimizer_groups(groups), lr=train_config.learning_rate,
                                   betas=train_config.betas, weight_decay=train_config.weight_decay)
        self.step_count = 0

    # ---- construction ------------------------------------------------------------------
    def _build_chunks(self):
        config, grid = self.config, self.grid
        if config.tp > 1 or config.sequence_parallel:
            pieces = tensor_parallel_pieces(self.model_config, grid.tp, config.sequence_parallel, config.dtype)
        else:
            pieces = label_replicated(GPT(self.model_config, dtype=config.dtype)).pieces()  # each gets its shard
        pieces = axes.swap_layers(pieces, grid, config)  # ep: this rank's experts; cp: attention over the cp ring
        self.expert_ids = axes.experts_of(pieces)
        return partition(pieces, config.pp, grid.pp_rank, chunks_per_stage(config.schedule, config.virtual_stages),
                         config.split, placement_of(config.schedule))  # zbv: 2 chunks in a V

    def _build_executor(self):
        config = self.config
        micro_batch = config.batch_size // (config.dp * config.ep * config.microbatches)
        length = self.model_config.block_size // (config.cp * (config.tp if config.sequence_parallel else 1))
        activation_shape = (micro_batch, length, self.model_config.n_embd)  # (B/(dp ep m), T/(cp [tp]), C)
        return PipelineExecutor(self.chunks, self.grid.pp, config.schedule, config.microbatches, activation_shape,
                                getattr(xp, config.dtype), recompute=config.recompute,
                                loss_scale=axes.loss_scale(config))

    def _build_gradient_sync(self):
        config = self.config
        if config.dp == 1:
            if config.zero and self.grid.world.rank == 0:
                print(f"note: --zero {config.zero} with dp = 1 has no effect: ZeRO shards over the "
                      f"data-parallel group, and a group of one has nothing to share", flush=True)
            return SingleReplica(self.parameters)
        if config.zero:
            return Zero(self.chunks, self.grid.dp, config.zero, accumulation_steps=config.microbatches,
                        overlap=config.overlap)
        # Each broadcasts dp rank 0's parameters at construction, so replicas start identical.
        options = {"bucket_bytes": int(config.bucket_megabytes * 2**20), "accumulation_steps": config.microbatches}
        if config.compress != "none":
            compressor = make_compressor(config.compress, topk_ratio=config.topk_ratio,
                                         powersgd_rank=config.powersgd_rank, seed=self.model_config.seed)
            return CompressedDataParallel(self.parameters, self.grid.dp, compressor, **options)
        if config.local_sgd:
            return LocalSGD(self.parameters, self.grid.dp, config.local_sgd, **options)
        if config.allreduce == "hierarchical":
            node = node_of_world_rank(config.ranks_per_node) if config.ranks_per_node else shared_memory_node(self.grid.dp)
            return HierarchicalDataParallel(self.parameters, self.grid.dp, NodeGroups(self.grid.dp, node), **options)
        return DataParallel(self.parameters, self.grid.dp, overlap=config.overlap, algorithm=config.allreduce, **options)

    def _place(self, name, parameter):
        """What the optimizer updates for ``parameter``, with its placement on every axis.

        tp: as the layers placed it (Shard, or Replicate / Partial under sequence parallelism).
        pp: each stage holds its own layers (whole tensors dealt out), but the tied embedding is one
        weight with two uses, a copy on the first and on the last stage: Partial, summed between them.
        dp: every replica's gradient is a part (its rows), averaged by the sync; ZeRO's parts are a
        Shard of the flattened parameter instead.
        """
        pp = Shard(None)
        head_stage = getattr(self.executor, "loss_stage", self.config.pp - 1)  # 0 when a V puts both ends on rank 0
        if name == TIED_EMBEDDING and head_stage != 0:
            pp = Partial("sum", holders=(0, head_stage))
        place(parameter, dp=Partial("avg"), pp=pp)
        axes.place_on_axes(parameter, self.expert_ids, self.config)  # cp and ep: parallel/axes.py
        tensor = self.sync.updated_tensor(parameter)
        if tensor is not parameter:
            place(tensor, **{**parameter.placements, "dp": Shard(0)})
        return tensor

    # ---- one step ----------------------------------------------------------------------
    def train_step(self, inputs, targets):
        """One optimizer step on the global batch (B, T); returns the mean loss on every rank."""
        loss = self.compute_gradients(inputs, targets)
        self.update()
        return loss

    def compute_gradients(self, inputs, targets):
        """Batch -> forward/backward -> aggregate: after it, every tensor in ``sync.updated`` holds its
        part of the single-process gradient. Returns the mean loss, on every rank."""
        config = self.config
        if inputs.shape[0] != config.batch_size:
            raise ConfigError(f"batch has {inputs.shape[0]} rows, the configuration says {config.batch_size}")
        check_token_ids(inputs, targets, self.model_config.vocab_size)  # every rank: the same global batch
        inputs, targets = axes.local_batch(inputs, targets, self.grid, config)  # (B/(dp ep), T/cp)
        self.sync.start_step()
        with self.precision.computing():  # --precision bf16|fp16: every op's output rounded to 16 bits
            loss = self.executor.run(split_microbatches(inputs, config.microbatches),  # m x (B/(dp m), T)
                                     split_microbatches(targets, config.microbatches))
        for gradient_sum in self.gradient_sums:  # dp average, sequence-parallel sum, tied-embedding sum
            gradient_sum.finish_gradient_sync()
        return self._share_loss(loss)

    def update(self):
        """Clip by the global gradient norm, step AdamW on the updated tensors, finish the step."""
        if self.precision.gradients_finite():  # fp16: unscaled; skipped on every rank after an overflow
            if self.config.grad_clip > 0:
                clip_grad_norm(self.sync.updated, self.config.grad_clip, self.grad_norm_squared())
            self.optimizer.set_lr(learning_rate_at(self.config, self.step_count))
            self.precision.step(self.optimizer)  # on the fp32 masters, then their 16-bit working copies
        self.sync.after_optimizer_step(self.step_count)
        self.step_count += 1

    def grad_norm_squared(self):
        """||g||^2 of the whole single-process model, each full parameter counted once (collective)."""
        return grad_norm_squared(self.norm_tensors, self.norm_groups)

    def _share_loss(self, loss):
        """The last stage knows the loss; average it over the dp x ep x cp ranks (each holds as many
        tokens) and give it to every rank."""
        buffer = xp.zeros(1, dtype=xp.float64)
        if loss is not None:
            buffer[0] = loss  # a 0-d array, still on the device
        self.grid.pp.broadcast(buffer, root=self.executor.loss_stage)  # p - 1, or 0 under ZB-V
        data = self.grid.group("dp", "ep", "cp")
        data.allreduce(buffer)
        return scalar_to_host(buffer) / data.size  # the step's one copy to the host

    # ---- the single-process view -------------------------------------------------------
    def num_parameters(self):
        """Numbers in the whole single-process model (collective over tp and pp)."""
        parameters = [p for _, p in self.named_parameters]
        summed = agreed_norm_axes(parameters, self.grid)
        buffer = xp.array([sum(p.size for p in parameters if counts_in_model_sum(p, self.grid, summed))],
                          dtype=xp.float64)
        for axis in summed:
            self.grid.group(axis).allreduce(buffer)
        return int(buffer[0])

    def gather_state(self, arrays_by_parameter=None):
        """On world rank 0: {full name: full array} joined from every rank's shards; None elsewhere.

        ``arrays_by_parameter`` maps id(p) of a local parameter to an array shaped like p
        (optimizer moments, say); by default the parameters' values. Replica dp rank 0 sends.
        Collective: every rank calls it (under ZeRO the dp group first all-gathers).
        """
        if arrays_by_parameter is None:
            arrays_by_parameter = self.sync_state.parameter_arrays()
        return gather_full_arrays(self.parameters, arrays_by_parameter, self.grid)

    # ---- this rank's arrays, for (distributed) checkpoints ------------------------------
    # Arrays have the shape of the parameter (its tensor-parallel shard) under every ZeRO stage;
    # under ZeRO the calls are collective over the dp group.
    def parameter_arrays(self):
        """{full name: copy of this rank's tensor-parallel shard of the parameter}."""
        arrays = self.sync_state.parameter_arrays()
        return {name: arrays[id(p)] for name, p in self.named_parameters}

    def load_parameter_arrays(self, arrays):
        """Set every local parameter from {full name: its tensor-parallel shard}."""
        self._check_shapes(arrays, "parameter")
        for name, p in self.named_parameters:
            self.sync_state.load_parameter(p, xp.asarray(from_host(arrays[name]), dtype=p.dtype))

    def optimizer_state_arrays(self):
        """{full name: {"m": array, "v": array}}, AdamW's moments (zeros before the first step)."""
        moments = self.sync_state.optimizer_state_arrays(self.optimizer)
        return {name: moments[id(p)] for name, p in self.named_parameters}

    def load_optimizer_state_arrays(self, states, step_count):
        """The reverse of ``optimizer_state_arrays``; ``step_count``: optimizer steps taken (AdamW's t)."""
        for slot in MOMENTS:
            self._check_shapes({name: slots[slot] for name, slots in states.items() if slot in slots}, f"AdamW {slot}")
        for name, p in self.named_parameters:
            moments = {slot: xp.asarray(from_host(states[name][slot]), dtype=p.dtype) for slot in MOMENTS}
            self.sync_state.load_optimizer_state(self.optimizer, p, moments)
        self.step_count = self.optimizer.step_count = step_count

    def _check_shapes(self, arrays, what):
        """Every local parameter present with its shape, or a CheckpointError."""
        for name, p in self.named_parameters:
            if name not in arrays or tuple(arrays[name].shape) != p.shape:
                found = "nothing" if name not in arrays else f"shape {tuple(arrays[name].shape)}"
                raise CheckpointError(f"{what} {name!r}: rank {self.grid.world.rank} needs shape {p.shape}, "
                                      f"got {found}")

    def sync_state_arrays(self):
        """{name: array} that only this rank holds (``sync.state_arrays``): compression residuals,
        local SGD's replica; saved per rank, restored under the same layout."""
        return self.sync_state.state_arrays(self.optimizer)

    def load_sync_state_arrays(self, arrays):
        self.sync_state.load_state_arrays({name: from_host(array) for name, array in arrays.items()}, self.optimizer)

    def memory_report(self):
        """Bytes this rank holds after a step (``memory_report`` of the gradient sync in use)."""
        return self.sync_state.memory_report(self.optimizer)
