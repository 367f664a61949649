"""The planner against published runs: each row of a paper's table as a layout, predicted.

The rows themselves (the papers' values, with table and row) live in a JSON file the caller
gives (tests/data/published_runs.json in the repository); this module turns a row into a
``Strategy`` on the A100 profile (or the row's own GPU and network, for the other published
runs: BLOOM, MT-NLG, Llama 3) and returns the prediction, under the "ideal" engine (the
papers' Megatron-LM and DeepSpeed overlap what they can; minipar's engine is another matter).
FLOPs per GPU are counted as each paper counts them: Narayanan et al. 2021 count executed FLOPs
($96·B·s·L·h²(1 + s/6h + V/16Lh)$: the recomputed forward included); Korthikanti et al. 2022
report the iteration time itself.
"""
import dataclasses
import json

from minipar.plan.cost import flops_per_step, predict
from minipar.plan.hardware import LINK_EFFICIENCY, named_machine
from minipar.plan.memory import Headroom
from minipar.plan.model import PRESETS
from minipar.plan.strategy import Strategy


def load(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def row_strategy(row):
    cp = row.get("cp", 1)
    dp = row["gpus"] // (row["tp"] * row["pp"] * cp)
    microbatches = row["batch"] // (dp * row["micro_batch"])
    v = row.get("virtual_stages", 1)
    return Strategy(dp, row["tp"], row["pp"], row["batch"], microbatches, "interleaved" if v > 1 else "1f1b", v,
                    row.get("zero", 0), row.get("sequence_parallel", False), row["recompute"], "mixed",
                    cp=cp, engine="ideal")


def predict_row(row, machine_name="a100"):
    """(model, machine, prediction) of a stored row; a row may name its GPU (``machine``), its
    sequence length (``block_size``), FlashAttention-style kernels (``fused_attention``) and its
    network where it is not the profile's (``network_gbytes_per_gpu``: GB/s per GPU between nodes)."""
    model = PRESETS[row["preset"]]
    if "block_size" in row:
        model = dataclasses.replace(model, block_size=row["block_size"])
    machine = named_machine(row.get("machine", machine_name), row["gpus"], 8,
                            fused_attention=row.get("fused_attention", False))
    if "network_gbytes_per_gpu" in row:
        machine = dataclasses.replace(machine, inter_beta=1 / (row["network_gbytes_per_gpu"] * 1e9 * LINK_EFFICIENCY))
    return model, machine, predict(model, row_strategy(row), machine, overlap=True, headroom=Headroom())


def executed_tflops(model, prediction, gpus):
    """Narayanan et al.'s teraFLOP/s per GPU: model FLOPs plus the recomputed forward of the layers."""
    recompute = 1.0 if prediction.strategy.recompute == "full" else 0.0
    return flops_per_step(model, prediction.strategy.batch_size, recompute) / prediction.step / gpus / 1e12


def compare(data):
    """{table: [(row, paper, predicted, relative error)]} for every stored table."""
    out = {"korthikanti2022_table5": [], "narayanan2021_table1": [], "narayanan2021_table2": []}
    for row in data["korthikanti2022_table5"]["rows"]:
        _, _, prediction = predict_row(row)
        out["korthikanti2022_table5"].append((row["row"], row["iteration_s"], prediction.step,
                                              prediction.step / row["iteration_s"] - 1))
    for table in ("narayanan2021_table1", "narayanan2021_table2"):
        for row in data[table]["rows"]:
            model, _, prediction = predict_row(row)
            got = executed_tflops(model, prediction, row["gpus"])
            out[table].append((row["row"], row["tflops_per_gpu"], got, got / row["tflops_per_gpu"] - 1))
    return out


def compare_other(data):
    """[(row, metric, paper, predicted, relative error)] for the other published runs: each row's
    ``metric`` is its iteration time (s), or TFLOP/s per GPU counted with the recomputed forward
    (``tflops_executed``, as Megatron's formula counts) or without it (``tflops_model``)."""
    out = []
    for row in data["other_runs"]["rows"]:
        model, _, prediction = predict_row(row)
        if row["metric"] == "iteration_s":
            got = prediction.step
        else:
            recompute = 1.0 if row["metric"] == "tflops_executed" and row["recompute"] == "full" else 0.0
            got = flops_per_step(model, row["batch"], recompute) / prediction.step / row["gpus"] / 1e12
        out.append((row["row"], row["metric"], row["paper"], got, got / row["paper"] - 1))
    return out


# What Narayanan et al. 2021 ran: tensor parallelism across the node's 8 GPUs, 1F1B, full
# recomputation, neither ZeRO nor sequence parallelism.
PAPER_OPTIONS = {"tp": (8,), "zero": (0,), "sp": (False,), "recompute": ("full",), "schedules": ("1f1b",),
                 "engine": "ideal"}


def gpt3_pick(data):
    """The planner's fastest GPT-3 175B layout among the paper's options on its 1024 A100s."""
    from minipar.plan.search import rank_layouts

    run = data["narayanan2021_gpt3_days"]
    model, machine = PRESETS[run["preset"]], named_machine("a100", run["gpus"], 8)
    fitting, _ = rank_layouts(model, machine, run["batch"], PAPER_OPTIONS, True, Headroom.for_machine(machine))
    return fitting[0]


def gpt3_days(data, pick):
    """Days to train the stored token count with ``pick`` (a Prediction of the GPT-3 175B run)."""
    run = data["narayanan2021_gpt3_days"]
    steps = run["tokens"] / (pick.strategy.batch_size * PRESETS[run["preset"]].block_size)
    return steps * pick.step / 86400
