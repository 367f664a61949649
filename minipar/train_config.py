"""The run's configuration: ``TrainConfig``, a reason per field, checked whole at construction on
every rank alike, and the learning-rate schedule it sets (``learning_rate_at``).

The training loop that reads it is ``minipar/train.py`` (which also offers both names). A new mesh
axis is one field here beside ``dp``, ``tp`` and ``pp`` (docs/mesh.md).
"""
import dataclasses
from dataclasses import dataclass

from minipar.errors import ConfigError, require_finite, require_positive_int
from minipar.mixed_precision import check_precision_options
from minipar.optim import cosine_learning_rate
from minipar.parallel import axes
from minipar.parallel.mesh import AXES, MeshShape
from minipar.parallel.pipeline.schedules import chunks_per_stage
from minipar.parallel.topology import Layout


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer steps of the whole run (the cosine schedule ends here)
    batch_size: int = 64  # global batch, in sequences, summed over data-parallel replicas
    learning_rate: float = 3e-3  # peak of the warmup + cosine schedule
    min_learning_rate: float = 3e-4  # where the cosine ends
    warmup_steps: int = 50  # linear warmup, which keeps early Adam steps small
    weight_decay: float = 0.0  # AdamW's decoupled decay on matrices; 0 learns the addition task fastest, GPT-2 used 0.1
    betas: tuple = (0.9, 0.99)  # Adam's moment decay rates
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 turns it off
    seed: int = 1337  # batches are drawn from (seed, step); the model from GPTConfig.seed
    dtype: str = "float32"  # float64 for exact comparisons between layouts
    precision: str = "fp32"  # fp32 | bf16 | fp16: 16-bit compute on fp32 master weights (mixed_precision.py)
    # layout
    dp: int = 1  # data-parallel replicas
    tp: int = 1  # tensor-parallel ranks per layer
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert-parallel ranks, carved out of the data dimension: each holds E/ep experts and its rows
    cp: int = 1  # context-parallel ranks: each holds T/cp tokens of every sequence (parallel/axes.py)
    cp_layout: str = "contiguous"  # contiguous | zigzag (rank i holds chunks i and 2cp-1-i: balanced causal work)
    cp_attention: str = "ring"  # ring (K/V blocks around the cp ring) | allgather (Llama 3's variant)
    cp_overlap: bool = False  # ring: post the next K/V block's receive before computing on the one in hand
    microbatches: int = 1  # per step and replica; gradients accumulate over them
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zb-h1 | zb-h2 | zbv (zero bubble, Qi et al. 2023)
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    split: tuple = None  # blocks per pipeline chunk; None balances them
    recompute: bool = False  # recompute activations in backward instead of stashing them
    sequence_parallel: bool = False  # shard LayerNorm/dropout regions along the sequence
    zero: int = 0  # ZeRO stage over the data-parallel group (0 = off)
    bucket_megabytes: float = 1.0  # data-parallel gradient bucket size
    overlap: bool = False  # start bucket allreduces (ZeRO: reduce-scatters, stage 3 prefetches) during backward
    allreduce: str = "mpi"  # mpi | ring | recursive_doubling | tree | hierarchical (node by node)
    ranks_per_node: int = 0  # hierarchical: simulated nodes of K consecutive ranks; 0 = MPI's shared-memory nodes
    # cutting communication (docs/communication.md)
    compress: str = "none"  # none | fp16 | bf16 | topk | powersgd: how gradients travel (all but none are lossy)
    topk_ratio: float = 0.01  # top-k: fraction of each gradient tensor sent per step
    powersgd_rank: int = 2  # PowerSGD: rank r of the approximation P Qᵀ
    local_sgd: int = 0  # H > 0: no gradient exchange; average the parameters every H steps (Lin et al. 2020)
    optimizer: str = "adamw"  # adamw | sgd (plain SGD: local SGD with H = 1 is then exactly data parallelism)

    def __post_init__(self):
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        require_positive_int("steps", self.steps, minimum=0)
        _ = self.mesh_shape  # checks the size of every axis, in the one place that does (parallel/mesh.py)
        for name in ("batch_size", "microbatches", "virtual_stages"):
            require_positive_int(name, getattr(self, name))
        for name in ("learning_rate", "min_learning_rate", "weight_decay", "grad_clip"):
            require_finite(name, getattr(self, name), minimum=0.0)
        require_finite("bucket_megabytes", self.bucket_megabytes, minimum=0.0, strictly=True)
        require_positive_int("warmup_steps", self.warmup_steps, minimum=0)
        require_positive_int("seed", self.seed, minimum=0)
        if self.batch_size % (self.dp * self.microbatches):
            raise ConfigError(f"global batch size {self.batch_size} must be divisible by dp x microbatches "
                              f"= {self.dp} x {self.microbatches} = {self.dp * self.microbatches}")
        if self.ep > 1 or self.cp > 1:
            axes.check_options(self)
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ConfigError(f"virtual_stages = {self.virtual_stages} needs the interleaved schedule, "
                              f"not {self.schedule!r}")
        if self.schedule == "interleaved" and self.pp < 2:
            raise ConfigError("the interleaved schedule needs at least 2 pipeline stages (pp >= 2), got pp = 1")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero and self.dp > 1 and self.allreduce != "mpi":
            raise ConfigError("--allreduce chooses how plain data parallelism allreduces; "
                              "ZeRO reduce-scatters and all-gathers instead, so drop it or --zero")
        self._check_communication_options()
        check_precision_options(self)  # --precision: mixed_precision.py

    def _check_communication_options(self):
        """The options of docs/communication.md: each refused, in one sentence, where it does not apply."""
        from minipar.comm.compression import COMPRESSION_METHODS

        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.compress not in COMPRESSION_METHODS:
            raise ConfigError(f"compress must be one of {COMPRESSION_METHODS}, got {self.compress!r}")
        if not 0 < self.topk_ratio <= 1:
            raise ConfigError(f"topk_ratio must be in (0, 1], got {self.topk_ratio!r}")
        require_positive_int("powersgd_rank", self.powersgd_rank)
        require_positive_int("local_sgd", self.local_sgd, minimum=0)
        require_positive_int("ranks_per_node", self.ranks_per_node, minimum=0)
        chosen = [name for name, on in (("--compress", self.compress != "none"), ("--local-sgd", self.local_sgd > 0),
                                        ("--allreduce hierarchical", self.allreduce == "hierarchical")) if on]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)} are alternatives: choose one")
        if chosen and self.zero:
            raise ConfigError(f"{chosen[0]} changes plain data parallelism's allreduce; ZeRO reduce-scatters "
                              f"its gradients instead, so drop {chosen[0]} or --zero")
        if chosen and self.overlap:
            raise ConfigError(f"{chosen[0]} is blocking (it runs after backward), so it cannot --overlap")
        if self.ranks_per_node and self.allreduce != "hierarchical":
            raise ConfigError("--ranks-per-node describes nodes for --allreduce hierarchical; add that or drop it")

    @property
    def layout(self):
        return Layout(self.dp, self.tp, self.pp)

    @property
    def mesh_shape(self):
        """The device mesh: a size for every axis of ``AXES`` this configuration has a field for (a new
        axis is one field above), 1 for the others."""
        return MeshShape.of(**{axis: getattr(self, axis) for axis in AXES if hasattr(self, axis)})

    def check_model(self, model_config):
        """What this layout needs of the model, checked on every rank alike (not on one stage mid-step)."""
        from minipar.parallel.pipeline.partition import layers_per_chunk

        layers_per_chunk(model_config.n_layer, self.pp, chunks_per_stage(self.schedule, self.virtual_stages), self.split)
        if self.tp > 1 or self.sequence_parallel:
            from minipar.parallel.tensor_parallel import validate_tensor_parallel

            validate_tensor_parallel(model_config, self.tp, self.layout.world_size)
        if self.sequence_parallel and model_config.block_size % self.tp:
            raise ConfigError(f"sequence parallelism splits the sequence over the {self.tp} tensor-parallel ranks, "
                              f"so the block size ({model_config.block_size}) must be divisible by tp ({self.tp})")
        axes.check_model(model_config, self)  # cp and ep: parallel/axes.py

    def to_dict(self):
        return dataclasses.asdict(self)


def learning_rate_at(config, step):
    """The learning rate of optimizer step ``step`` (from 0): a linear warmup to ``learning_rate``, then
    the cosine down to ``min_learning_rate`` at ``steps`` (optim.cosine_learning_rate)."""
    return cosine_learning_rate(step, config.learning_rate, config.warmup_steps, config.steps,
                                config.min_learning_rate)
