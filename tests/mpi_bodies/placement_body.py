"""The placements the Trainer records, per parameter and axis (docs/mesh.md's table), run by tests/test_placement.py."""
from minipar.comm import Communicator
from minipar.nn.gpt import GPTConfig
from minipar.parallel.placement import placement_of
from minipar.train import TrainConfig, Trainer
from tests.mpi_bodies.reporting import report

MODEL = dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)


def expected_tp(name, sequence_parallel):
    """The table's tp column."""
    whole = "Partial(op='sum', holders=None)" if sequence_parallel else "Replicate()"
    if "norm" in name or name == "embedding.position.weight" or name.endswith("output.bias"):
        return whole
    if name.endswith("qkv.weight"):
        return "Shard(dim=1, blocks=3)"
    if name.endswith("qkv.bias"):
        return "Shard(dim=0, blocks=3)"
    if name.endswith("hidden.weight"):
        return "Shard(dim=1, blocks=1)"
    return "Shard(dim=0, blocks=1)"  # hidden.bias, the output weights, the token embedding


def trainer_placements(comm, layout):
    """Every updated tensor's placements on tp, pp and dp against the table, and the norm's axes."""
    world = Communicator(comm)
    config = TrainConfig(steps=1, batch_size=8, dtype="float64", **layout)
    trainer = Trainer(GPTConfig(**MODEL), config, world)
    pp, zero = layout.get("pp", 1), layout.get("zero", 0)
    checks = []
    for name, parameter in trainer.named_parameters:
        tensor = trainer.sync.updated_tensor(parameter)
        got = {axis: repr(placement_of(tensor, axis)) for axis in ("tp", "pp", "dp")}
        tied = name == "embedding.token.weight" and pp > 1
        tp = expected_tp(name, layout.get("sequence_parallel", False)) if layout.get("tp", 1) > 1 else "Replicate()"
        expected = {"tp": tp,
                    "pp": f"Partial(op='sum', holders=(0, {pp - 1}))" if tied else "Shard(dim=None, blocks=1)",
                    "dp": "Shard(dim=0, blocks=1)" if zero else "Partial(op='avg', holders=None)"}
        checks.append((f"rank {world.rank}: placements of {name}", got, "==", expected))
    axes = [group for group in ("pp", "dp", "tp") if trainer.grid.group(group) in trainer.norm_groups]
    expected_axes = [axis for axis in ("pp", "dp", "tp") if layout.get(axis, 1) > 1 and (axis != "dp" or zero)]
    checks.append((f"rank {world.rank}: the norm's axes", axes, "==", expected_axes))
    return report(["placements"], checks)
