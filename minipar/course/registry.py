"""The exercises, in the order a student does them.

Each exercise is one or more solution regions (``### BEGIN SOLUTION`` … ``### END SOLUTION``)
inside named functions of one file of the package, and a list of checks run on real MPI
ranks (``checks_*.py``). ``world_size`` is the number of ranks ``course check`` launches;
each check then runs on sub-communicators of the sizes where bugs hide (1, 2, 3, 4, 8 …).
"""
from dataclasses import dataclass

from minipar.errors import ConfigError


@dataclass(frozen=True)
class Exercise:
    name: str
    title: str
    path: str                 # the file holding the solution regions, relative to the repository root
    functions: tuple          # qualified names of the functions with a region ("LayerNorm.backward")
    minutes: int              # estimated time for a student who has read the lesson
    checks: str               # "module:NAME" of the check list in minipar.course
    world_size: int = 8       # ranks that `course check` starts
    lesson: str = ""          # the notebook to read first
    lesson_part: str = ""     # which part of it, when the exercise comes before the rest of that lesson
    docs: str = ""            # the page with the maths
    more: tuple = ()          # regions in other files: ((path, (function, ...)), ...)

    @property
    def regions(self):
        """Every (path, qualified function name) with a solution region of this exercise."""
        pairs = [(self.path, function) for function in self.functions]
        return pairs + [(path, function) for path, functions in self.more for function in functions]

    @property
    def paths(self):
        return sorted({path for path, _ in self.regions})


EXERCISES = (
    Exercise("layer_norm_backward", "Warm-up: the backward of layer normalisation (one process)",
             "minipar/ops/fused.py", ("LayerNorm.backward",), 20, "checks_ops:CHECKS",
             world_size=1, lesson="lessons/01_autograd.ipynb", docs="docs/design.md"),
    Exercise("ring_allreduce", "Ring allreduce = ring reduce-scatter + ring all-gather over Sendrecv",
             "minipar/comm/collectives.py", ("ring_reduce_scatter", "ring_all_gather"), 40,
             "checks_comm:RING", lesson="lessons/02_collectives.ipynb", docs="docs/collectives.md"),
    Exercise("recursive_doubling", "Recursive-doubling allreduce, folding ranks beyond a power of two",
             "minipar/comm/collectives.py", ("recursive_doubling_allreduce",), 40,
             "checks_comm:RECURSIVE_DOUBLING", lesson="lessons/02_collectives.ipynb", docs="docs/collectives.md"),
    Exercise("process_grid", "The 3D grid: rank -> (dp, tp, pp) coordinates and the three sub-communicators",
             "minipar/parallel/topology.py", ("Layout.coordinates", "ProcessGrid.__init__"), 25,
             "checks_grid:CHECKS", lesson="lessons/06_hybrid.ipynb", docs="docs/hybrid.md",
             lesson_part="sections 1-2 only (the grid, who talks to whom): they need no lesson after 02; "
                         "section 3 trains in every layout and comes after lessons 03-05"),
    Exercise("megatron_f_g", "Megatron's f and g, and the column- and row-parallel linear forward",
             "minipar/parallel/tensor_parallel_comm.py",
             ("CopyToTensorParallelRegion.forward", "CopyToTensorParallelRegion.backward",
              "ReduceFromTensorParallelRegion.forward", "ReduceFromTensorParallelRegion.backward"), 35,
             "checks_tensor:F_AND_G", lesson="lessons/04_tensor_parallel.ipynb", docs="docs/tensor_parallel.md",
             more=(("minipar/parallel/tensor_parallel.py",
                    ("ColumnParallelLinear.forward", "RowParallelLinear.forward")),)),
    Exercise("vocab_parallel_loss", "Vocabulary-parallel cross-entropy: global max, global sum, the target's shard",
             "minipar/parallel/tensor_parallel_comm.py", ("VocabParallelCrossEntropy.forward",), 40,
             "checks_tensor:VOCAB", lesson="lessons/04_tensor_parallel.ipynb", docs="docs/tensor_parallel.md"),
    Exercise("data_parallel", "Data-parallel gradient averaging over buckets, on the last micro-batch only",
             "minipar/parallel/data_parallel.py", ("DataParallel.gradient_ready", "DataParallel.finish_gradient_sync"),
             40, "checks_data:DATA_PARALLEL", lesson="lessons/03_data_parallel.ipynb", docs="docs/data_parallel.md"),
    Exercise("one_f_one_b", "The 1F1B schedule as data, checked by the simulator, then run by the executor",
             "minipar/parallel/pipeline/schedules.py", ("one_f_one_b",), 30, "checks_pipeline:ONE_F_ONE_B",
             world_size=4, lesson="lessons/05_pipeline_parallel.ipynb", docs="docs/pipeline_schedules.md"),
    Exercise("pipeline_messages", "The executor's activation and gradient send and receive for one micro-batch",
             "minipar/parallel/pipeline/executor.py", ("PipelineExecutor._send", "PipelineExecutor._receive"), 30,
             "checks_pipeline:MESSAGES", world_size=4, lesson="lessons/05_pipeline_parallel.ipynb",
             docs="docs/pipeline_parallel.md"),
    Exercise("zero_1", "ZeRO-1: reduce-scatter the gradients, update the own part, all-gather the parameters",
             "minipar/parallel/zero.py", ("Zero._rows", "Zero._reduce_scatter", "Zero.after_optimizer_step"), 40,
             "checks_data:ZERO_1", lesson="lessons/07_zero.ipynb", docs="docs/zero.md"),
    Exercise("zb_h1", "ZB-H1 as data: B and W split, each W put off so the bubble is a third of 1F1B's",
             "minipar/parallel/pipeline/zero_bubble.py", ("zb_h1",), 35, "checks_zero_bubble:ZB_H1",
             world_size=4, lesson="lessons/10_zero_bubble.ipynb", docs="docs/pipeline_schedules.md"),
    Exercise("ring_attention", "Ring attention: the log-sum-exp merge of partial results and one step of the K/V ring",
             "minipar/parallel/context_parallel.py", ("merge_partials", "ring_step"), 35,
             "checks_context:RING_ATTENTION", lesson="lessons/11_context_parallel.ipynb",
             docs="docs/context_parallel.md"),
    Exercise("pairwise_alltoall", "The pairwise-exchange all-to-all(v): N − 1 Sendrecv steps, one partner each way",
             "minipar/comm/collectives.py", ("pairwise_alltoall",), 30, "checks_alltoall:PAIRWISE_ALLTOALL",
             lesson="lessons/12_experts.ipynb", docs="docs/expert_parallel.md"),
)


def exercise_named(name):
    for exercise in EXERCISES:
        if exercise.name == name:
            return exercise
    names = ", ".join(exercise.name for exercise in EXERCISES)
    raise ConfigError(f"no exercise named {name!r}; the exercises are: {names}")


def exercises_in(path):
    """The exercises with regions in ``path`` (relative to the repository root)."""
    return [exercise for exercise in EXERCISES if path in exercise.paths]


def checks_of(exercise):
    """The exercise's list of ``Check``s (imported on demand: checks import MPI-side code)."""
    import importlib

    module_name, attribute = exercise.checks.split(":")
    return getattr(importlib.import_module(f"minipar.course.{module_name}"), attribute)
