"""The planner (minipar/plan/) against real steps, the schedules, the model and the papers' formulas.

The MPI tests run real training steps on 8 ranks and compare, for every rank, the planner's
prediction with what the step measured: parameter, gradient and AdamW bytes (the Trainer's
memory_report) and the bytes sent per group (the communicators' traffic counters) to the byte,
and the peak bytes the autograd engine kept for backward (counted at save_for_backward) to the
byte, integer index arrays aside (minipar/plan/measure.py says why).
"""
import pytest

from minipar.errors import ConfigError
from minipar.nn.gpt import GPT, GPTConfig
from minipar.plan import cli
from minipar.plan.cost import flops_per_step, stage_forward_flops
from minipar.plan.hardware import Machine, load_machine, named_machine
from minipar.plan.memory import in_flight, korthikanti_layer_bytes, layer_activation_bytes, paper_parameter_memory
from minipar.plan.model import PRESETS, ModelSpec, Strategy, rank_parameters
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

def test_plan_gpt3_on_1024_gpus_ranks_layouts_that_fit(capsys):
    # The command; ZeRO and recomputation narrowed to keep the default test run short.
    command = "--preset gpt3-175b --gpus 1024 --gpus-per-node 8 --gpu-memory 80 --top 5 --explain --zero 1,2"
    assert cli.main(f"{command} --recompute none,selective".split()) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 5, out
    steps = [float(row.split("|")[6]) for row in rows]
    totals = [float(row.split("|")[5]) for row in rows]
    assert steps == sorted(steps) and max(totals) <= 80, out
    assert all(" tp8 " in row for row in rows), out  # tensor parallelism fills the node
    assert "Tensor parallelism 8" in out and "bubble" in out


def test_plan_says_what_would_fit():
    with pytest.raises(ConfigError, match=r"nothing fits in 80 GB.*--gpu-memory \d+.*--gpus \d+"):
        cli.main("--preset gpt3-175b --gpus 8 --gpu-memory 80".split())
    with pytest.raises(ConfigError, match="divisible"):
        cli.main("--n-layer 2 --n-embd 64 --n-head 3 --block-size 16 --vocab 64 --gpus 8".split())
    with pytest.raises(ConfigError, match="either --preset"):
        cli.main("--preset gpt2-small --n-layer 2 --gpus 8".split())


def test_plan_writes_a_memory_chart(tmp_path):
    path = tmp_path / "memory.png"
    cli.main(f"--preset gpt2-small --gpus 16 --top 3 --plot {path}".split())
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
