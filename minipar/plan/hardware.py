"""Machines the planner can target: named GPU profiles with their sources, or a calibration file.

A machine is what the time model needs: achieved FLOP/s per rank, memory per rank, ranks per
node, and for the links inside and between nodes a latency α (s) and a time per byte β (s/B).
Collective times follow the α–β costs of the collectives lesson (Thakur, Rabenseifner & Gropp
2005; docs/collectives.md), for a group of N ranks and n bytes:

    allreduce (ring)             2(N−1)α + 2((N−1)/N) n β
    all-gather, reduce-scatter   (N−1)α + ((N−1)/N) n β
    broadcast (binomial tree)    ⌈lg N⌉ (α + n β)
    send                         α + n β

A group whose ranks all sit on one node uses the node's links (NVLink); one that spans nodes is
limited by the slowest link its ring crosses, the network port (InfiniBand).

Named profiles (vendor data sheets, as collected in the project's reference notes):
  A100 SXM 80 GB: 312 TFLOP/s dense bf16 (NVIDIA A100 data sheet); NVLink 3, 600 GB/s per GPU
    (bidirectional, so 300 GB/s each way); InfiniBand HDR, 200 Gb/s = 25 GB/s per GPU; HBM2e 2.0 TB/s.
  H100 SXM 80 GB: 989 TFLOP/s dense bf16 (NVIDIA H100 data sheet); NVLink 4, 900 GB/s per GPU
    (450 GB/s each way); InfiniBand NDR, 400 Gb/s = 50 GB/s per GPU; HBM3 3.35 TB/s.
Assumptions, not data-sheet figures: a large transformer's matmuls reach about half of peak
(Narayanan et al. 2021 report 44-52% of peak on A100s for their Table 1 runs); link latencies of
5 µs (NVLink) and 10 µs (InfiniBand, through the NCCL stack).

A calibration file (``python -m minipar calibrate``) replaces all of this with numbers measured
here: FLOP/s per rank and a per-block overhead fitted on real blocks, and per (collective, group
size) a fitted time = a + n·b.
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
    source: str = ""

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
        if kind in ("allgather", "reduce_scatter"):
            return (size - 1) * alpha + share * nbytes * beta
        if kind == "broadcast":
            return math.ceil(math.log2(size)) * (alpha + nbytes * beta)
        return alpha + nbytes * beta  # send

    def to_json(self):
        return json.dumps(asdict(self), indent=1)


def _gpu(name, gpus, gpus_per_node, memory_gb, peak, efficiency, nvlink_each_way, ib, hbm, source):
    return Machine(name, gpus, gpus_per_node, memory_gb * 1e9, peak * efficiency, 5e-6, 1 / nvlink_each_way,
                   10e-6, 1 / ib, hbm, source=source)


PROFILES = {
    "a100": dict(peak=312e12, nvlink_each_way=300e9, ib=25e9, hbm=2.0e12, memory_gb=80,
                 source="NVIDIA A100 data sheet (312 TFLOP/s bf16, NVLink 3 600 GB/s); InfiniBand HDR 200 Gb/s"),
    "h100": dict(peak=989e12, nvlink_each_way=450e9, ib=50e9, hbm=3.35e12, memory_gb=80,
                 source="NVIDIA H100 SXM data sheet (989 TFLOP/s bf16, NVLink 4 900 GB/s); InfiniBand NDR 400 Gb/s"),
}
DEFAULT_EFFICIENCY = 0.5  # of peak, on large matmuls (Narayanan et al. 2021: 44-52%)


def named_machine(profile, gpus, gpus_per_node=8, memory_gb=None, efficiency=DEFAULT_EFFICIENCY):
    key = profile.lower()
    if key not in PROFILES:
        raise ConfigError(f"unknown hardware profile {profile!r}; known: {sorted(PROFILES)} or a calibration file")
    spec = dict(PROFILES[key])
    memory = memory_gb if memory_gb is not None else spec.pop("memory_gb")
    spec.pop("memory_gb", None)
    return _gpu(key.upper(), gpus, gpus_per_node, memory, efficiency=efficiency, **spec)


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
