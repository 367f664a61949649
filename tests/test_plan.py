"""The planner (minipar/plan/) against real steps, the schedules, the model and the papers' formulas.

The MPI tests run real training steps on 8 ranks and compare, for every rank, the planner's
prediction with what the step measured: parameter, gradient and AdamW bytes (the Trainer's
memory_report) and the bytes sent per group (the communicators' traffic counters) to the byte,
and the peak bytes the autograd engine kept for backward (counted at save_for_backward) to the
byte, integer index arrays aside (minipar/plan/measure.py says why).
"""
import argparse
import json
from pathlib import Path

import pytest

from minipar.errors import ConfigError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.plan import cli, papers
from minipar.plan.cost import flops_per_step, pipeline_bubble, stage_forward_flops, step_time
from minipar.plan.hardware import Machine, load_machine, named_machine
from minipar.plan.memory import (
    Headroom,
    in_flight,
    korthikanti_layer_bytes,
    layer_activation_bytes,
    memory_per_rank,
    paper_parameter_memory,
    peak_full_gradient_bytes,
)
from minipar.plan.model import PRESETS, ModelSpec, block_parameters
from minipar.plan.search import candidate_strategies, rank_layouts
from minipar.plan.strategy import Strategy, rank_parameters, representative_stages
from minipar.testing import results_from_ranks

SMALL = GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=8, n_embd=32)

# Every factorisation of 8 ranks, each once plain and once with options that change what it holds
# or sends: ZeRO 1-3 where dp > 1, sequence parallelism where tp > 1, recomputation and the other
# schedules where pp > 1.
FACTORISATIONS = [(1, 1, 8), (1, 2, 4), (1, 4, 2), (1, 8, 1), (2, 1, 4), (2, 2, 2), (2, 4, 1), (4, 1, 2), (4, 2, 1),
                  (8, 1, 1)]


def _layout(dp, tp, pp, **options):
    return {"dp": dp, "tp": tp, "pp": pp, "microbatches": 2 if pp > 1 else 1, **options}


def _with_options(dp, tp, pp, index):
    options = {}
    if dp > 1:
        options["zero"] = 1 + index % 3
    if tp > 1:
        options["sequence_parallel"] = True
    if pp > 1:
        options.update([("recompute", True), ("schedule", "gpipe"), ("microbatches", 4)][index % 3:index % 3 + 1]
                       if index % 3 < 2 else [("schedule", "interleaved"), ("virtual_stages", 2), ("microbatches", pp)])
    return _layout(dp, tp, pp, **options)


DEFAULT_LAYOUTS = [_layout(*f) for f in FACTORISATIONS] + [_with_options(*f, i) for i, f in enumerate(FACTORISATIONS)]
# ZeRO-2 accumulating micro-batches: minipar holds every gradient whole until the last backward
DEFAULT_LAYOUTS.append(_layout(8, 1, 1, zero=2, microbatches=2))


def _compare(nranks, layouts):
    results = results_from_ranks(nranks, "tests.mpi_bodies.plan_body:compare_layouts", timeout=2300, layouts=layouts)
    mismatches = []
    for rank, pairs in enumerate(results):
        assert [pair["layout"] for pair in pairs] == layouts, f"rank {rank} measured other layouts"
        for pair in pairs:
            assert set(pair["measured"]) == set(pair["predicted"]), pair
            for quantity, got in pair["measured"].items():
                expected = pair["predicted"][quantity]
                if expected != got:
                    mismatches.append(f"{pair['layout']} rank {rank} {quantity}: "
                                      f"predicted {expected}, measured {got}")
    assert len(results) == nranks
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.timeout(900)  # 20 layouts on 8 ranks: about 80 s on 2 shared cores, more under load
def test_every_factorisation_of_8_ranks_predicts_memory_activations_and_traffic_to_the_byte():
    _compare(8, DEFAULT_LAYOUTS)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 62 layouts on 8 ranks
def test_every_factorisation_of_8_ranks_with_every_option():
    layouts = []
    for dp, tp, pp in FACTORISATIONS:
        for zero in (0, 1, 2, 3) if dp > 1 else (0,):
            for sequence_parallel in (False, True) if tp > 1 else (False,):
                for recompute in (False, True):
                    layouts.append(_layout(dp, tp, pp, zero=zero, sequence_parallel=sequence_parallel,
                                           recompute=recompute))
    _compare(8, layouts)


# ---- the model's shapes ---------------------------------------------------------------------------

def test_parameter_count_and_order_match_the_gpt():
    model = ModelSpec.from_gpt_config(SMALL)
    gpt = GPT(SMALL)
    assert model.parameters == sum(p.size for p in gpt.parameters())
    expected = [p.size for _, p in gpt.named_parameters()]
    got = [n for _, _, n in rank_parameters(model, Strategy(1, 1, 1, 8), 0)]
    assert got == expected


def test_in_flight_closed_forms_equal_the_schedules():
    """GPipe m, 1F1B min(p - s, m), interleaved (v-1)p + 2(p-s-1) + 1: counted on the schedules (data)."""
    from minipar.parallel.pipeline.schedules import BACKWARD, FORWARD, build_schedule

    for schedule, p, m, v in [("gpipe", 4, 6, 1), ("1f1b", 4, 2, 1), ("1f1b", 4, 8, 1), ("1f1b", 8, 16, 1),
                              ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2), ("interleaved", 2, 2, 4)]:
        strategy = Strategy(1, 1, p, 2 * m, m, schedule, v)
        for stage in range(p):
            live = peak = 0
            for action in build_schedule(schedule, p, m, stage, v):
                live += (action.kind == FORWARD) - (action.kind == BACKWARD)
                peak = max(peak, live)
            assert in_flight(strategy, stage) == peak, (schedule, p, m, v, stage)


def test_model_flops_are_three_forwards_summed_over_stages():
    model = PRESETS["megatron-18b"]
    strategy = Strategy(4, 2, 4, 64, 8, precision="mixed")
    forward = sum(stage_forward_flops(model, strategy, stage) for stage in range(strategy.pp))
    total = 3 * forward * strategy.tp * strategy.dp * strategy.microbatches
    assert total == pytest.approx(flops_per_step(model, 64), rel=1e-12)


# ---- the papers -----------------------------------------------------------------------------------

def test_zero_paper_memory_for_its_7_5b_model_on_64_ranks():
    """Rajbhandari et al. 2020, Figure 1: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per device (Ψ = 7.5B, N_d = 64)."""
    got = [sum(paper_parameter_memory(7.5e9, stage, 64).values()) / 1e9 for stage in range(4)]
    assert [round(value, 1) for value in got] == [120.0, 31.4, 16.6, 1.9]


def test_korthikanti_formulas_agree_at_one_rank_and_engine_formula_tracks_them():
    model = PRESETS["gpt3-175b"]
    s, h, a = model.block_size, model.n_embd, model.n_head
    plain = s * h * (34 + 5 * a * s / h)
    assert korthikanti_layer_bytes(model, 1, 1, False) == pytest.approx(plain)
    assert korthikanti_layer_bytes(model, 1, 1, True) == pytest.approx(plain)
    assert korthikanti_layer_bytes(model, 1, 8, True) == pytest.approx(plain / 8)
    assert korthikanti_layer_bytes(model, 1, 8, False, "full") == 2 * s * h
    # minipar keeps no dropout masks and one copy of the softmax: its s² term is a·s² elements, not 5as²/h·sh bytes
    small = ModelSpec.from_gpt_config(SMALL)
    assert layer_activation_bytes(small, 2, 1, True) == layer_activation_bytes(small, 2, 1, False)


# ---- the command line and the machine ------------------------------------------------------------

def test_plan_gpt3_on_1024_gpus_picks_a_layout_that_fits_by_minipars_accounting(capsys):
    # The command; ZeRO, recomputation and schedules narrowed to keep the default test run short.
    command = ("--preset gpt3-175b --gpus 1024 --gpus-per-node 8 --gpu-memory 80 --top 5 --explain --zero 0,2 "
               "--recompute selective --schedules 1f1b,interleaved")
    assert cli.main(command.split()) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 5, out
    assert "Tensor parallelism" in out and "bubble" in out and "GPU-hours" in out and "MFU" in out
    assert "NVLink" in out  # GPUs: the links have their names
    model, machine = PRESETS["gpt3-175b"], named_machine("a100", 1024, 8, 80)
    options = cli.options_from(argparse.Namespace(zero="0,2", recompute="selective", cp="1", sequence_parallel="both",
                                                  schedules="1f1b,interleaved", engine="minipar", state_bytes=16),
                               "bf16")
    fitting, _ = rank_layouts(model, machine, 1536, options, True, Headroom.for_machine(machine))
    best = fitting[0]
    assert best.strategy.describe() in rows[0], (best.strategy.describe(), rows[0])
    steps = [p.step for p in fitting]
    assert steps == sorted(steps)
    for stage, memory in zip(representative_stages(best.strategy), best.memory_by_stage, strict=True):
        # minipar's own accounting, term by term: ZeRO-2 with m > 1 holds the whole 16-bit gradient
        again = memory_per_rank(model, best.strategy, stage, Headroom.for_machine(machine))
        assert again == memory and memory["total"] <= 80e9
        if best.strategy.effective_zero == 2 and best.strategy.microbatches > 1:
            psi = sum(n for _, _, n in rank_parameters(model, best.strategy, stage))
            assert memory["gradients"] == 2 * psi
        assert memory["framework"] == 2e9 and memory["fragmentation"] > 0


def test_plan_says_what_would_fit():
    with pytest.raises(ConfigError, match=r"nothing fits in 80 GB.*--gpu-memory \d+.*--gpus \d+"):
        cli.main("--preset gpt3-175b --gpus 8 --gpu-memory 80 --zero 0,3 --schedules 1f1b".split())
    with pytest.raises(ConfigError, match="divisible"):
        cli.main("--n-layer 2 --n-embd 64 --n-head 3 --block-size 16 --vocab 64 --gpus 8".split())
    with pytest.raises(ConfigError, match="either --preset"):
        cli.main("--preset gpt2-small --n-layer 2 --gpus 8".split())


def test_plan_writes_a_memory_chart(tmp_path):
    path = tmp_path / "memory.png"
    cli.main(f"--preset gpt2-small --gpus 16 --top 3 --schedules 1f1b --zero 0 --recompute none "
             f"--sequence-parallel off --plot {path}".split())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_file_round_trips(tmp_path):
    machine = Machine("here", 8, 8, 1e9, 2e9, 0, 0, 0, 0, 1e9, 1e-3, {"allreduce/2": [1e-4, 1e-9]})
    path = tmp_path / "calibration.json"
    path.write_text(machine.to_json())
    loaded = load_machine(str(path), gpus=4)
    assert loaded.fitted == machine.fitted and loaded.gpus == 4
    assert loaded.collective_time("allreduce", 1000, 2) == pytest.approx(1e-4 + 1e-6)
    with pytest.raises(ConfigError, match="cannot read"):
        load_machine(str(tmp_path / "missing.json"))


def test_alpha_beta_costs_follow_the_ring():
    a100 = named_machine("a100", 16)
    n = 1e9
    inside = a100.collective_time("allreduce", n, 8, stride=1)
    across = a100.collective_time("allreduce", n, 8, stride=8)
    assert inside == pytest.approx(14 * a100.intra_alpha + 2 * 7 / 8 * n * a100.intra_beta)
    assert across == pytest.approx(14 * a100.inter_alpha + 2 * 7 / 8 * n * a100.inter_beta)
    assert across > 10 * inside  # InfiniBand per GPU is 12x slower than NVLink each way


# ---- the published runs (tests/data/published_runs.json: the papers' values, table and row) -------

PUBLISHED = papers.load(Path(__file__).parent / "data" / "published_runs.json")


@pytest.mark.parametrize("table", ["korthikanti2022_table5", "narayanan2021_table1", "narayanan2021_table2"])
def test_published_runs_are_predicted_within_10_percent(table):
    """Korthikanti Table 5 (step time), Narayanan Tables 1 and 2 (TFLOP/s per GPU): every row within 10%."""
    rows = papers.compare(PUBLISHED)[table]
    assert len(rows) == {"korthikanti2022_table5": 8, "narayanan2021_table1": 10, "narayanan2021_table2": 12}[table]
    misses = [f"{row}: paper {paper}, predicted {got:.4g} ({error:+.1%})"
              for row, paper, got, error in rows if abs(error) > 0.10]
    assert not misses, "\n".join(misses)


def test_gpt3_175b_on_1024_gpus_trains_300b_tokens_in_about_34_days():
    pick = papers.gpt3_pick(PUBLISHED)
    days = papers.gpt3_days(PUBLISHED, pick)
    assert pick.strategy.tp == 8 and pick.fits
    assert abs(days / PUBLISHED["narayanan2021_gpt3_days"]["days"] - 1) <= 0.10, (pick.strategy.describe(), days)


def test_published_values_are_the_papers():
    """Spot checks that the stored values were not edited toward the predictions: each paper's own
    cross-checks (Korthikanti: 1T at 56.3% MFU; Narayanan: aggregate PFLOP/s = GPUs x TFLOP/s)."""
    one_t = next(r for r in PUBLISHED["korthikanti2022_table5"]["rows"] if r["preset"] == "megatron-1t"
                 and r["recompute"] == "selective")
    model_flops = flops_per_step(PRESETS["megatron-1t"], one_t["batch"])
    assert model_flops / one_t["iteration_s"] / one_t["gpus"] / 312e12 == pytest.approx(0.563, abs=0.001)
    aggregate = {1.7: 4.4, 18.4: 34.6, 145.6: 227.1, 1008.0: 502.0}  # PFLOP/s, Narayanan Table 1's last column
    for row in PUBLISHED["narayanan2021_table1"]["rows"]:
        size = float(row["row"].split("B")[0])
        if size in aggregate:
            assert row["gpus"] * row["tflops_per_gpu"] / 1e3 == pytest.approx(aggregate[size], rel=0.01)


# ---- the model's shapes: Llama, GQA, SwiGLU, experts, config.json ----------------------------------

def test_llama_presets_count_their_published_parameters():
    counts = {name: PRESETS[name].parameters / 1e9 for name in ("llama2-7b", "llama2-70b", "llama3-8b", "llama3-70b")}
    assert counts == pytest.approx({"llama2-7b": 6.74, "llama2-70b": 68.98, "llama3-8b": 8.03, "llama3-70b": 70.55},
                                   abs=0.01)


def test_hugging_face_config_gives_the_same_model(tmp_path):
    config = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "num_hidden_layers": 80, "max_position_embeddings": 4096,
              "vocab_size": 32000, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model = ModelSpec.from_hf_config(str(path))
    assert model.parameters == PRESETS["llama2-70b"].parameters and model.kv_heads == 8 and not model.tied
    gpt2 = ModelSpec.from_hf_config({"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024,
                                     "vocab_size": 50304})
    assert gpt2.parameters == PRESETS["gpt2-small"].parameters
    with pytest.raises(ConfigError, match="cannot read"):
        ModelSpec.from_hf_config(str(tmp_path / "missing.json"))


def test_experts_and_context_parallelism_change_what_a_rank_holds():
    dense = ModelSpec(8, 512, 8, 1024, 1000, ffn="swiglu", ffn_hidden=1024, norm="rmsnorm", bias=False,
                      learned_positions=False, tied=False)
    moe = ModelSpec(8, 512, 8, 1024, 1000, ffn="swiglu", ffn_hidden=1024, norm="rmsnorm", bias=False,
                    learned_positions=False, tied=False, experts=8, top_k=2)
    mlp = 3 * 512 * 1024
    assert moe.parameters - dense.parameters == 8 * (7 * mlp + 512 * 8)  # 7 more experts and a router per layer
    assert moe.active_parameters == moe.parameters - 8 * 6 * mlp
    one = sum(n for _, _, n in rank_parameters(moe, Strategy(8, 1, 1, 8, precision="mixed"), 0))
    four = sum(n for _, _, n in rank_parameters(moe, Strategy(8, 1, 1, 8, precision="mixed", ep=4), 0))
    assert one - four == 8 * 6 * mlp  # ep 4: 2 of the 8 experts on a rank
    whole = korthikanti_layer_bytes(dense, 1, 2, True)
    assert korthikanti_layer_bytes(dense, 1, 2, True, cp=2) < whole / 2 + 1  # the sequence split in two


def test_gqa_shrinks_kv_and_swiglu_has_three_matrices():
    llama = PRESETS["llama2-70b"]
    h, f = 8192, 28672
    per_layer = sum(n for _, n in block_parameters(llama, 1))
    assert per_layer == h * (h + 2 * 1024) + h * h + 3 * h * f + 2 * h


# ---- what minipar does, and what it could do ------------------------------------------------------

def test_zero2_with_microbatches_holds_one_unit_whole_and_zero1_the_whole_gradient():
    model = PRESETS["gpt2-small"]
    today = Strategy(2, 1, 1, 8, 4, zero=2)  # the case: m = 4, 2 ranks
    psi = sum(n for _, _, n in rank_parameters(model, today, 0))
    peak = peak_full_gradient_bytes(model, today, 0)
    assert peak < 4 * psi / 2, f"ZeRO-2 reduce-scatters each micro-batch: one unit at a time, got {peak} of {4 * psi}"
    assert peak_full_gradient_bytes(model, today.with_(zero=1), 0) == 4 * psi
    assert memory_per_rank(model, today, 0)["gradients"] == max(peak, 4 * psi / 2)


def test_minipar_overlaps_zero_with_backward_and_the_ideal_engine_is_labelled():
    model, machine = PRESETS["megatron-1.7b"], named_machine("a100", 32, 8)
    base = Strategy(32, 1, 1, 512, 8, zero=1, precision="mixed")
    today = step_time(model, base, machine, overlap=True)
    ideal = step_time(model, base.with_(engine="ideal"), machine, overlap=True)
    plain = step_time(model, base.with_(zero=0), machine, overlap=True)
    no_overlap = step_time(model, base.with_(zero=0), machine, overlap=False)
    serial = step_time(model, base, machine, overlap=False)
    assert today["dp"] < serial["dp"], "minipar overlaps ZeRO's reduce-scatters with backward under --overlap"
    assert plain["dp"] < no_overlap["dp"] and ideal["dp"] != today["dp"]


def test_headroom_is_counted_and_megatron_keeps_18_bytes():
    model = PRESETS["gpt3-175b"]
    strategy = Strategy(16, 8, 8, 1536, 96, precision="mixed")
    bare = memory_per_rank(model, strategy, 0)
    room = memory_per_rank(model, strategy, 0, Headroom(2e9, 0.5e9, 0.05))
    tensors = bare["total"]
    assert room["total"] == pytest.approx(tensors * 1.05 + 2.5e9)
    assert sum(paper_parameter_memory(1e9, 0, 1, 18).values()) == 18e9
    wider = memory_per_rank(model, strategy.with_(state_bytes=18), 0)
    psi = sum(n for _, _, n in rank_parameters(model, strategy, 0))
    assert wider["gradients"] - bare["gradients"] == 2 * psi


# ---- schedules: the simulator, the zero-bubble formulas, the search ------------------------------

def test_bubbles_come_from_the_simulator_and_its_closed_form_agrees():
    from minipar.plan import cost

    for schedule, p, m, v in [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("interleaved", 4, 8, 2), ("1f1b", 8, 16, 1)]:
        strategy = Strategy(1, 1, p, m, m, schedule, v)
        simulated = pipeline_bubble(strategy, 1.0, 2.0)
        assert p * m * v <= cost.SIMULATOR_LIMIT
        assert simulated == pytest.approx((p - 1) / v * 3.0), (schedule, p, m, v)


def test_zero_bubble_formulas():
    h1 = Strategy(1, 1, 4, 8, 8, "zb-h1")
    assert pipeline_bubble(h1, 1.0, 2.0) == pytest.approx(3 * 1.0)  # (p-1)(F + B - W), B = W = 1
    # ZB-H2 leaves no gap inside any rank's span, but a synchronous optimizer step (what minipar
    # runs) still waits for the (p-1)·T_F start/end skew: the simulator's bubble, not the paper's 0.
    assert pipeline_bubble(h1.with_(schedule="zb-h2"), 1.0, 2.0) == pytest.approx(3 * 1.0)
    assert pipeline_bubble(h1.with_(schedule="zbv", virtual_stages=2), 1.0, 2.0) == pytest.approx(3 * 1.0 / 2)  # (p-1)T_F/2
    assert pipeline_bubble(h1.with_(schedule="1f1b"), 1.0, 2.0) == pytest.approx(3 * 3.0)
    assert in_flight(h1.with_(schedule="zb-h2"), 0) == 7  # 2p - 1


def test_search_covers_every_schedule_and_axis():
    model = PRESETS["megatron-18b"]
    options = {"engine": "ideal", "zero": (0,), "sp": (False,), "recompute": ("full",), "cp": (1, 2)}
    seen = {(s.schedule, s.virtual_stages) for s in candidate_strategies(model, 64, 512, 8, options)}
    assert {("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4), ("zb-h1", 1), ("zb-h2", 1),
            ("zbv", 2)} <= seen
    assert any(s.cp == 2 for s in candidate_strategies(model, 64, 512, 8, options))
    from minipar.parallel.pipeline.schedules import SCHEDULE_NAMES

    ours = {s.schedule for s in candidate_strategies(model, 64, 512, 8, {**options, "engine": "minipar"})}
    assert ours <= set(SCHEDULE_NAMES)  # minipar's engine: what its executor runs
    moe = ModelSpec(8, 512, 8, 256, 1024, experts=8, top_k=2)
    assert {s.ep for s in candidate_strategies(moe, 8, 64, 8, {**options, "precision": ("mixed",)})} >= {1, 2, 8}


# ---- output: units, wording, summary -------------------------------------------------------------

def test_small_models_print_units_that_fit_and_cpu_wording(tmp_path, capsys):
    machine = Machine("here", 8, 8, 4e9, 2e9, 0, 0, 0, 0, 1e9, 1e-3, {})
    path = tmp_path / "calibration.json"
    path.write_text(machine.to_json())
    cli.main(f"--n-layer 4 --n-embd 64 --n-head 4 --block-size 32 --vocab 64 --batch-size 16 --gpus 8 "
             f"--machine {path} --explain --top 3 --tokens 1e6".split())
    out = capsys.readouterr().out
    assert "0.0 GB" not in out and " 0 TFLOP/s" not in out
    assert " MB " in out or " KB " in out
    assert "NVLink" not in out and "InfiniBand" not in out and "shared memory" in out
    assert "rank-hours" in out and "GPU" not in out


@pytest.mark.parametrize("schedule, v", [("zb-h1", 1), ("zb-h2", 1), ("zbv", 2)])
def test_zero_bubble_closed_form_beyond_the_simulator_agrees_with_it(schedule, v, monkeypatch):
    """Above SIMULATOR_LIMIT the planner uses the paper's bubble plus a synchronous step's skew:
    the same number the simulator gives where both can run (p = 8, m = 32, F = 1, B + W = 2)."""
    from minipar.plan import cost

    strategy = Strategy(1, 1, 8, 32, 32, schedule, v)
    simulated = pipeline_bubble(strategy, 1.0, 2.0)
    monkeypatch.setattr(cost, "SIMULATOR_LIMIT", 0)
    assert pipeline_bubble(strategy, 1.0, 2.0) == pytest.approx(simulated), schedule
