"""Machines the planner can target: named GPU profiles with their sources, or a calibration file.

A machine is what the time model needs: achieved FLOP/s per rank, memory per rank, ranks per
node, and for the links inside and between nodes a latency $α$ (s) and a time per byte $β$ (s/B).
Collective times follow the α–β costs of the collectives lesson (Thakur, Rabenseifner & Gropp
2005; docs/collectives.md), for a group of $N$ ranks and $n$ bytes:

| collective                 | time                              |
|----------------------------|-----------------------------------|
| allreduce (ring)           | $2(N−1)α + 2((N−1)/N) n β$        |
| all-gather, reduce-scatter | $(N−1)α + ((N−1)/N) n β$          |
| broadcast (binomial tree)  | $⌈lg N⌉ (α + n β)$                |
| send                       | $α + n β$                         |

A group whose ranks all sit on one node uses the node's links (NVLink); one that spans nodes is
limited by the slowest link its ring crosses, the network port (InfiniBand).

Named profiles (vendor data sheets, as collected in the project's reference notes):
  A100 SXM 80 GB: 312 TFLOP/s dense bf16, 108 SMs (NVIDIA A100 data sheet and architecture
    whitepaper); NVLink 3, 600 GB/s per GPU (300 GB/s each way); InfiniBand HDR, 200 Gb/s =
    25 GB/s per GPU; HBM2e 2.0 TB/s.
  H100 SXM 80 GB: 989 TFLOP/s dense bf16, 132 SMs (NVIDIA H100 data sheet and whitepaper);
    NVLink 4, 900 GB/s per GPU (450 GB/s each way); InfiniBand NDR, 400 Gb/s = 50 GB/s per GPU;
    HBM3 3.35 TB/s.
The documented global constants (the only numbers not from a data sheet; the same for every
model, layout and paper row):
  GEMM_EFFICIENCY = 0.77: the share of peak cuBLAS reaches on large bf16 GEMMs (about 240 of
    the A100's 312 TFLOP/s);
  MEMORY_EFFICIENCY = 0.90: the share of the HBM bandwidth that streaming kernels reach;
  LINK_EFFICIENCY = 0.75: the share of a link's bandwidth that NCCL's collectives reach (its
    "bus bandwidth", nccl-tests doc/PERFORMANCE.md, against the data sheet's figure);
  link latencies of 5 µs (NVLink) and 10 µs (InfiniBand, through the NCCL stack).
GEMM_EFFICIENCY and MEMORY_EFFICIENCY were chosen together, on a coarse grid (0.76-0.80 ×
0.8/0.9), as the pair that keeps all 30 stored paper rows within 10% (docs/planning.md shows the
grid); cost.OVERLAP_LOSS is the third global constant.
Kernel times from these: minipar/plan/kernels.py.

A calibration file (``python -m minipar calibrate``) replaces all of this with numbers measured
here: GEMM FLOP/s per shape class (kernels.py: thin × wide products on a grid), the per-block
cost GEMMs do not explain fitted on real blocks, and per (collective, group size) a fitted time
= a + n·b.
"""
import json
import math
from dataclasses import asdict, dataclass, field

from minipar.errors import ConfigError


@dataclass
class Machine:
    name: str
    gpus: int
    gpus_per_node: int
    memory_bytes: float
    flops: float  # achieved FLOP/s per rank on the model's matmuls
    intra_alpha: float
    intra_beta: float
    inter_alpha: float
    inter_beta: float
    memory_bandwidth: float  # B/s, for the optimizer step (it streams every parameter's state)
    overhead_per_block: float = 0.0  # s per block forward + backward that FLOPs do not explain
    fitted: dict = field(default_factory=dict)  # {"allreduce/4": [a, b]}: measured collectives
    # calibrated CPU ranks (kernels.py): [[thin, wide, FLOP/s], ...] per GEMM shape class, and the
    # seconds per element of the block's elementwise work; an empty table: one rate (flops) for all
    gemm_table: list = field(default_factory=list)
    elementwise_seconds: float = 0.0
    source: str = ""
    # GPU profiles only (0 for a calibrated machine, which times measured blocks instead):
    peak: float = 0.0  # dense 16-bit FLOP/s of the data sheet
    hbm: float = 0.0  # B/s
    sms: int = 0  # streaming multiprocessors (tile quantisation)
    gemm_efficiency: float = 0.0
    memory_efficiency: float = 0.0
    fused_attention: bool = False  # FlashAttention-style kernels: no s² traffic (Dao et al. 2022)
    device: str = "cpu"  # "gpu" or "cpu": what the ranks are (and how --explain speaks of links)

    @property
    def gemm_rates(self):
        """{(thin, wide): FLOP/s} from ``gemm_table`` (kernels.gemm_seconds_cpu reads it)."""
        return {(int(thin), int(wide)): rate for thin, wide, rate in self.gemm_table}

    @property
    def is_gpu_profile(self):
        return self.peak > 0

    def spans_nodes(self, stride, size):
        """Ranks r, r + stride, ..., r + (size-1)·stride: on one node only if they fit in one."""
        return stride * size > self.gpus_per_node

    def collective_time(self, kind, nbytes, size, stride=1):
        """Seconds for one call of ``kind`` moving ``nbytes`` (the n of the formulas) over ``size`` ranks."""
        if size == 1:
            return 0.0
        fit = self.fitted.get(f"{kind}/{size}")
        if fit is not None:
            return fit[0] + fit[1] * nbytes
        inter = self.spans_nodes(stride, size)
        alpha, beta = (self.inter_alpha, self.inter_beta) if inter else (self.intra_alpha, self.intra_beta)
        share = (size - 1) / size
        if kind == "allreduce":
            return 2 * (size - 1) * alpha + 2 * share * nbytes * beta
        if kind in ("allgather", "reduce_scatter", "alltoall"):
            return (size - 1) * alpha + share * nbytes * beta
        if kind == "broadcast":
            return math.ceil(math.log2(size)) * (alpha + nbytes * beta)
        return alpha + nbytes * beta  # send

    def to_json(self):
        return json.dumps(asdict(self), indent=1)


GEMM_EFFICIENCY = 0.77
MEMORY_EFFICIENCY = 0.90
LINK_EFFICIENCY = 0.75

PROFILES = {
    "a100": dict(peak=312e12, nvlink_each_way=300e9, ib=25e9, hbm=2.0e12, sms=108, memory_gb=80,
                 source="NVIDIA A100 data sheet (312 TFLOP/s bf16, NVLink 3 600 GB/s); InfiniBand HDR 200 Gb/s"),
    "h100": dict(peak=989e12, nvlink_each_way=450e9, ib=50e9, hbm=3.35e12, sms=132, memory_gb=80,
                 source="NVIDIA H100 SXM data sheet (989 TFLOP/s bf16, NVLink 4 900 GB/s); InfiniBand NDR 400 Gb/s"),
}


def named_machine(profile, gpus, gpus_per_node=8, memory_gb=None, fused_attention=False):
    key = profile.lower()
    if key not in PROFILES:
        raise ConfigError(f"unknown hardware profile {profile!r}; known: {sorted(PROFILES)} or a calibration file")
    spec = PROFILES[key]
    memory = memory_gb if memory_gb is not None else spec["memory_gb"]
    link = LINK_EFFICIENCY
    return Machine(key.upper(), gpus, gpus_per_node, memory * 1e9, spec["peak"] * GEMM_EFFICIENCY, 5e-6,
                   1 / (spec["nvlink_each_way"] * link), 10e-6, 1 / (spec["ib"] * link), spec["hbm"] * MEMORY_EFFICIENCY,
                   source=spec["source"], peak=spec["peak"], hbm=spec["hbm"], sms=spec["sms"],
                   gemm_efficiency=GEMM_EFFICIENCY, memory_efficiency=MEMORY_EFFICIENCY,
                   fused_attention=fused_attention, device="gpu")


def load_machine(path, gpus=None, memory_gb=None):
    """A Machine from a ``calibrate`` JSON file (``gpus`` / ``memory_gb`` override its figures)."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
        machine = Machine(**values)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"cannot read the calibration file {path}: {error}") from None
    if gpus is not None:
        machine.gpus = gpus
        machine.gpus_per_node = max(machine.gpus_per_node, gpus)  # one machine: every rank on one node
    if memory_gb is not None:
        machine.memory_bytes = memory_gb * 1e9
    return machine
