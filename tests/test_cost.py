"""Cost model (energy per token, throughput, digital memory) and placement under a budget."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAMILIES, placed

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main
from hetmoe_compile.compose.pipeline import place_scores
from hetmoe_compile.cost import (
    CostParams,
    Estimator,
    estimate_cost,
    format_bytes,
    load_cost_params,
    parse_bytes,
    parse_energy,
    place_under_budget,
    profile_model,
)
from hetmoe_compile.cost.params import SOURCES, describe_params
from hetmoe_compile.models import recognize
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.placement import Placement, PlacementPolicy, place, validate_placement
from hetmoe_compile.runtime.manifest import validate_manifest
from hetmoe_compile.scoring.base import Scores
from hetmoe_compile.scoring.random_scores import score_random
from hetmoe_compile.transforms.hpd import split_linear

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "olmoe-demo"
P = CostParams()


def _scores(info, seed=0):
    return Scores("test", score_random(None, info, seed=seed))


def _expected(model, n_digital: int, ctx: int = 2048) -> dict:
    """The cost model's formulas evaluated by hand from the tiny OLMoE's config (uniform routing, batch 1)."""
    c = model.config
    h, i, e, k, v = c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok, c.vocab_size
    hd, kv, heads, layers = h // c.num_attention_heads, c.num_key_value_heads, c.num_attention_heads, 2
    wb, p = 4, k / e
    n_analog = e - n_digital
    dense_macs = layers * (h * h + 2 * h * kv * hd + h * h + e * h) + v * h
    score_macs = layers * heads * 2 * hd * ctx
    expert_macs = layers * n_digital * p * 3 * h * i
    non_expert = sum(t.numel() for n, t in model.named_parameters() if ".experts." not in n)
    dense_bytes = (non_expert - v * h + h) * wb  # the embedding reads one row per token
    kv_bytes = layers * kv * 2 * hd * ctx * wb
    expert_bytes = layers * n_digital * 3 * h * i * wb * p  # fetched when used (batch 1: p)
    cells = layers * n_analog * p * 2 * 512**2  # gate_up [32, 32] and down [32, 16]: one 512x512 tile each
    hit = 1 - math.comb(n_digital, k) / math.comb(e, k) if n_analog else 0.0
    link_bits = layers * hit * 2 * h * 16
    macs, nbytes = dense_macs + score_macs + expert_macs, dense_bytes + kv_bytes + expert_bytes
    energy = {
        "digital_compute": macs * 1.5e-12,
        "digital_memory": nbytes * 31.2e-12,
        "analog_mvm": cells * 0.205e-12,
        "link": link_bits * 0.54e-12,
    }
    time = max(macs / 494.7e12, nbytes / 3.35e12) + layers * hit * 2 * 133e-9 + link_bits / 8 / 900e9
    footprint = non_expert * wb + layers * n_digital * 3 * h * i * wb
    return {
        "energy": energy,
        "tokens_per_s": 1 / time,
        "footprint": footprint,
        "tiles": layers * n_analog * 2,
        "analog_weights": layers * n_analog * 3 * h * i,
    }


@pytest.mark.parametrize("fraction, n_digital", [(0.0, 0), (0.25, 2), (1.0, 8)])
def test_estimate_matches_hand_computation(olmoe, fraction, n_digital):
    model, info = olmoe
    placement = place(model, info, _scores(info), PlacementPolicy(digital_fraction=fraction))
    got = estimate_cost(model, placement, info=info)
    want = _expected(model, n_digital)
    for key, value in want["energy"].items():
        assert got.energy_breakdown_j[key] == pytest.approx(value, rel=1e-12, abs=1e-30), key
    assert got.energy_per_token_j == pytest.approx(sum(want["energy"].values()), rel=1e-12)
    assert got.tokens_per_s == pytest.approx(want["tokens_per_s"], rel=1e-12)
    assert got.digital_memory_bytes == want["footprint"]
    assert got.analog_tiles == want["tiles"] and got.analog_weights == want["analog_weights"]
    d = got.to_dict()
    assert d["assumptions"]["routing"] == "uniform" and d["assumptions"]["params"] == P.to_dict()
    assert "energy per token" in got.table() and "tokens/s" in got.table()


def test_more_digital_experts_more_digital_bytes_and_device_ordering(olmoe):
    model, info = olmoe
    scores = _scores(info)
    costs = [
        estimate_cost(model, place(model, info, scores, PlacementPolicy(digital_fraction=f)), info=info)
        for f in (0.0, 0.125, 0.25, 0.5, 1.0)
    ]
    footprints = [c.digital_memory_bytes for c in costs]
    assert footprints == sorted(set(footprints))  # strictly increasing
    assert [c.analog_tiles for c in costs] == sorted({c.analog_tiles for c in costs}, reverse=True)
    all_analog = estimate_cost(model, place(model, info, scores, PlacementPolicy(0.0, dense="analog")), info=info)
    dense_digital, all_digital = costs[0], costs[-1]
    assert all_analog.digital_memory_bytes < dense_digital.digital_memory_bytes < all_digital.digital_memory_bytes
    assert all_analog.energy_per_token_j < dense_digital.energy_per_token_j < all_digital.energy_per_token_j
    assert all_digital.energy_breakdown_j["analog_mvm"] == 0 and all_digital.analog_tiles == 0
    # dense on analog: the nn.Linear layers of attention and the LM head go to tiles; embeddings, norms, routers not
    c = model.config
    h, kv = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    analog_dense = 2 * (2 * h * h + 2 * h * kv) + c.vocab_size * h
    assert all_analog.analog_weights - dense_digital.analog_weights == analog_dense
    routers = 2 * c.num_experts * h
    assert all_analog.per_token["digital_macs"] == pytest.approx(dense_digital.per_token["digital_macs"] - analog_dense)
    assert all_analog.per_token["digital_macs"] >= routers


def test_batching_shares_weight_fetches(olmoe):
    model, info = olmoe
    placement = place(model, info, _scores(info), PlacementPolicy(digital_fraction=1.0))
    one = estimate_cost(model, placement, CostParams(batch_size=1, context_length=16), info=info)
    eight = estimate_cost(model, placement, CostParams(batch_size=8, context_length=16), info=info)
    assert eight.per_token["digital_bytes"] < one.per_token["digital_bytes"]
    assert eight.per_token["digital_macs"] == one.per_token["digital_macs"]
    assert eight.tokens_per_s > one.tokens_per_s and eight.digital_memory_bytes == one.digital_memory_bytes
    # an expert used with probability p = K/E is fetched by a batch of 8 with probability 1 - (1 - p)^8
    p, e_bytes = 2 / 8, 3 * 32 * 16 * 4
    diff = one.per_token["digital_bytes"] - eight.per_token["digital_bytes"]
    dense_once = diff - 16 * e_bytes * (p - (1 - (1 - p) ** 8) / 8)
    assert dense_once > 0


def test_measured_routing_and_quantised_digital_experts(olmoe):
    model, info = olmoe
    placement = place(model, info, _scores(info), PlacementPolicy(digital_fraction=0.25))
    devices = placement.devices()
    freq = {}
    for layer, experts in devices.items():
        digital = [e for e, d in experts.items() if d == "digital"]
        freq[layer] = [1.0 if e in digital else 0.0 for e in range(8)]  # every token routes to the digital pair
    cost = estimate_cost(model, placement, info=info, frequencies=freq)
    assert cost.assumptions["routing"] == "measured"
    assert cost.energy_breakdown_j["analog_mvm"] == 0 and cost.energy_breakdown_j["link"] == 0
    full = estimate_cost(model, placement, info=info).digital_memory_bytes
    int4 = estimate_cost(model, placement, CostParams(digital_bits=4, group_size=16), info=info)
    h, i, n = 32, 16, 2 * 2
    per_expert = (2 * i * h + h * i) / 2 + (2 * i * h // 16 + h * i // 16) * 4
    assert full - int4.digital_memory_bytes == n * (3 * h * i * 4 - per_expert)
    assert int4.assumptions["digital_experts_bits"] == 4 and "INT4" in int4.table()
    with pytest.raises(HetMoEError, match="group size 128 does not divide"):
        estimate_cost(model, placement, CostParams(digital_bits=8), info=info)


def test_hpd_split_projection_counts_u_sigma_as_analog():
    model = tiny_model("olmoe")
    info = recognize(model)
    placement = place(model, info, _scores(info), PlacementPolicy(digital_fraction=1.0))
    before = estimate_cost(model, placement, info=info)
    attn = model.model.layers[0].self_attn
    attn.o_proj = split_linear(attn.o_proj, 8, "attention_output", "attention")[0]  # rank 8 of 32
    after = estimate_cost(model, placement, info=info)
    assert after.per_token["digital_macs"] == before.per_token["digital_macs"] - 32 * 32 + 32 * 8
    assert after.digital_memory_bytes == before.digital_memory_bytes - (32 * 32 - 32 * 8) * 4
    assert after.analog_tiles == 1 and after.analog_weights == 8 * 32
    assert after.per_token["analog_cell_macs"] == 512**2
    assert after.per_token["link_bits"] == (8 + 32) * 16
    assert after.time_per_token_s["analog"] == pytest.approx(133e-9)
    # dense on analog keeps v_t digital
    ablation = estimate_cost(model, placement, info=info, dense="analog")
    assert ablation.per_token["digital_macs"] >= 32 * 8


def test_cost_config_files_override_and_reject_unknown_keys(tmp_path):
    js = tmp_path / "cost.json"
    js.write_text(json.dumps({"batch_size": 16, "digital_mac_energy_j": 1e-12, "digital_bits": None}))
    assert load_cost_params(js) == CostParams(batch_size=16, digital_mac_energy_j=1e-12)
    toml = tmp_path / "cost.toml"
    toml.write_text("context_length = 512\nanalog_mac_energy_j = 0.3e-12\nanalog_tile_size = 256\n")
    got = load_cost_params(toml, digital_bits=4)
    assert (got.context_length, got.analog_mac_energy_j, got.analog_tile_size, got.digital_bits) == (
        512,
        0.3e-12,
        256,
        4,
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_sise = 4\n")
    with pytest.raises(HetMoEError, match=r"unknown cost parameter\(s\) batch_sise; valid keys: digital_macs_per_s"):
        load_cost_params(bad)
    for text, message in (
        ("batch_size = 0", "batch_size must be > 0"),
        ("link_bit_energy_j = -1.0", "link_bit_energy_j must be > 0"),
        ("digital_bits = 5", "digital_bits must be 4 or 8"),
        ("batch_size = 1.5", "must be an integer"),
        ("batch_size = true", "must be a number"),
    ):
        bad.write_text(text + "\n")
        with pytest.raises(HetMoEError, match=message):
            load_cost_params(bad)
    with pytest.raises(HetMoEError, match="not valid JSON"):
        (tmp_path / "x.json").write_text("{")
        load_cost_params(tmp_path / "x.json")
    with pytest.raises(HetMoEError, match="cost config file not found"):
        load_cost_params(tmp_path / "missing.toml")
    assert set(SOURCES) == set(CostParams().to_dict())
    assert "Le Gallo" in describe_params() and "Horowitz" in describe_params() and "Poulton" in describe_params()


def test_byte_and_energy_parsing():
    assert parse_bytes("12000000") == 12_000_000 and parse_bytes("64MiB") == 64 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("2 k") == 2048 and parse_bytes("3mb") == 3_000_000
    assert parse_energy("2.5e-3") == 2.5e-3
    for bad in ("abc", "12 parsecs", "-5MiB", "0", ""):
        with pytest.raises(HetMoEError, match="--digital-memory-budget"):
            parse_bytes(bad)
    for bad in ("x", "0", "-1e-3", "nan", "inf"):
        with pytest.raises(HetMoEError, match="--energy-budget"):
            parse_energy(bad)
    with pytest.raises(HetMoEError, match="must be a finite number > 0"):
        PlacementPolicy(digital_memory_budget=-5)
    with pytest.raises(HetMoEError, match="give one budget"):
        PlacementPolicy(digital_memory_budget=5, energy_budget=1.0)


def _greedy_per_layer(scores, budget_experts: int) -> set:
    """Round-robin by score (all experts cost the same bytes): each round, every layer's next best, best first."""
    ranked = {l: sorted(range(len(s)), key=lambda e: (-s[e], e)) for l, s in scores.layers.items()}
    order = []
    for r in range(8):
        order += sorted(((l, ranked[l][r]) for l in ranked), key=lambda c: (-scores.layers[c[0]][c[1]], c))
    return set(order[:budget_experts])


def test_memory_budget_picks_the_hand_computed_greedy_set(olmoe):
    model, info = olmoe
    scores = _scores(info)
    base = estimate_cost(model, place(model, info, scores, PlacementPolicy(0.0)), info=info).digital_memory_bytes
    expert = 3 * 32 * 16 * 4
    budget = base + 5 * expert + 100
    p = place_under_budget(model, info, scores, PlacementPolicy(), memory_budget=budget)
    got = {(l.index, e) for l in p.layers for e in l.ids("digital")}
    assert got == _greedy_per_layer(scores, 5)
    assert p.cost["digital_memory_bytes"] == base + 5 * expert <= budget
    assert p.policy.digital_memory_budget == budget and p.policy.digital_fraction == 5 / 16
    best0 = int(np.argmax(scores.layers[0]))
    assert p.layers[0].experts[best0].reason == (
        f"score/byte rank 1/8 in layer 0; fits the {format_bytes(budget)} budget"
    )
    worst0 = int(np.argmin(scores.layers[0]))
    assert p.layers[0].experts[worst0].reason.startswith("score/byte rank 8/8 in layer 0; does not fit the")
    assert p.cost["assumptions"]["budget"]["used"] == base + 5 * expert
    # global scope: the top 3 scores over both layers
    g = place_under_budget(model, info, scores, PlacementPolicy(scope="global"), memory_budget=base + 3 * expert)
    every = sorted(((l, e) for l in scores.layers for e in range(8)), key=lambda c: -scores.layers[c[0]][c[1]])
    assert {(l.index, e) for l in g.layers for e in l.ids("digital")} == set(every[:3])
    assert "over all layers" in g.layers[0].experts[0].reason
    # an override to digital counts against the budget
    forced = _greedy_per_layer(scores, 16) - _greedy_per_layer(scores, 5)
    li, e = sorted(forced)[0]
    o = place_scores(
        model, info, scores, PlacementPolicy(overrides={f"{li}:{e}": "digital"}, digital_memory_budget=budget)
    )
    assert sum(len(l.ids("digital")) for l in o.layers) == 5 and e in o.layers[li].ids("digital")
    # the placement round-trips through placement.json and old files (no cost, no budget) still load
    doc = p.to_dict()
    validate_placement(doc)
    assert Placement.from_dict(json.loads(json.dumps(doc))).policy.digital_memory_budget == budget
    old = {k: v for k, v in doc.items() if k != "cost"}
    old["policy"] = {k: v for k, v in doc["policy"].items() if k != "digital_memory_budget"}
    assert Placement.from_dict(old).cost is None


def test_energy_budget_respects_the_budget_and_orders_by_score(olmoe):
    model, info = olmoe
    scores = _scores(info)
    est = Estimator(profile_model(model, info), P)
    low = estimate_cost(model, place(model, info, scores, PlacementPolicy(0.0)), info=info).energy_per_token_j
    high = estimate_cost(model, place(model, info, scores, PlacementPolicy(1.0)), info=info).energy_per_token_j
    budget = low + 0.4 * (high - low)
    p = place_under_budget(model, info, scores, PlacementPolicy(), energy_budget=budget)
    assert p.cost["energy_per_token_j"] <= budget
    devices = p.devices()
    for layer in p.layers:  # equal expert costs within a layer: the digital ones are its best scores
        s = scores.layers[layer.index]
        n = len(layer.ids("digital"))
        assert set(layer.ids("digital")) == set(np.argsort(-s, kind="stable")[:n].tolist())
    for layer in p.layers:  # every analog expert would break the budget
        for e in layer.ids("analog"):
            trial = {li: dict(d) for li, d in devices.items()}
            trial[layer.index][e] = "digital"
            assert est.report(trial).energy_per_token_j > budget
    assert "score/energy rank" in p.layers[0].experts[0].reason and "J/token budget" in p.layers[0].experts[0].reason
    everything = place_under_budget(model, info, scores, PlacementPolicy(), energy_budget=high * 1.001)
    assert all(not l.ids("analog") for l in everything.layers)


def test_budget_too_small_says_what_fits(olmoe):
    model, info = olmoe
    scores = _scores(info)
    low = estimate_cost(model, place(model, info, scores, PlacementPolicy(0.0)), info=info).digital_memory_bytes
    high = estimate_cost(model, place(model, info, scores, PlacementPolicy(1.0)), info=info).digital_memory_bytes
    with pytest.raises(HetMoEError) as exc:
        place_under_budget(model, info, scores, PlacementPolicy(), memory_budget=low - 1)
    msg = str(exc.value)
    assert "budget" in msg and "too small" in msg and "dense modules on digital with no expert digital need" in msg
    assert f"need {format_bytes(low)}" in msg and f"all experts digital needs {format_bytes(high)}" in msg
    assert (
        place_under_budget(model, info, scores, PlacementPolicy(), memory_budget=low).cost["digital_memory_bytes"]
        == low
    )
    with pytest.raises(HetMoEError, match=r"energy budget 1.000 nJ/token is too small: .* need .*J/token"):
        place_under_budget(model, info, scores, PlacementPolicy(), energy_budget=1e-9)


def test_cli_place_with_budget_writes_and_prints_cost(tmp_path, capsys):
    out = tmp_path / "placement.json"
    assert main(["place", str(DEMO), "--digital-memory-budget", "8MiB", "--no-graph", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    validate_placement(doc)
    assert doc["policy"]["digital_memory_budget"] == 8 * 2**20
    assert 0 < doc["cost"]["digital_memory_bytes"] <= 8 * 2**20 and doc["cost"]["energy_per_token_j"] > 0
    assert "fits the 8.0 MiB budget" in doc["layers"][0]["experts"][0]["reason"] or any(
        "fits the 8.0 MiB budget" in e["reason"] for e in doc["layers"][0]["experts"]
    )
    printed = capsys.readouterr().out
    assert "digital memory budget 8.0 MiB (replaces --digital-fraction" in printed
    assert "energy per token" in printed and "tokens/s" in printed and "digital memory" in printed
    placement = Placement.load(out)
    assert placement.cost == doc["cost"]

    export = tmp_path / "export"
    assert (
        main(
            [
                "export",
                str(DEMO),
                "--placement",
                str(out),
                "--digital-bits",
                "8",
                "--group-size",
                "64",
                "--out",
                str(export),
            ]
        )
        == 0
    )
    manifest = json.loads((export / "manifest.json").read_text())
    validate_manifest(manifest)
    cost = manifest["cost"]
    assert cost["assumptions"]["digital_experts_bits"] == 8 and cost["assumptions"]["tile_size"] == 512
    assert cost["digital_memory_bytes"] < doc["cost"]["digital_memory_bytes"]  # INT8 digital experts
    assert "energy per token" in capsys.readouterr().out


def test_cli_place_default_stores_cost_and_bad_budgets_exit_2(tmp_path, capsys):
    out = tmp_path / "p.json"
    cfg = tmp_path / "cost.toml"
    cfg.write_text("batch_size = 4\n")
    assert (
        main(
            [
                "place",
                str(DEMO),
                "--digital-fraction",
                "0.25",
                "--cost-config",
                str(cfg),
                "--no-graph",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["cost"]["assumptions"]["params"]["batch_size"] == 4 and "digital_memory_budget" not in doc["policy"]
    capsys.readouterr()
    cases = [
        (["--digital-memory-budget", "12 parsecs"], "expected a size in bytes"),
        (["--digital-memory-budget", "0"], "more than 0 bytes"),
        (["--energy-budget", "-1"], "finite number of joules"),
        (["--digital-memory-budget", "1MiB", "--energy-budget", "1e-3"], "not allowed with argument"),
        (["--digital-memory-budget", "1MiB", "--digital-fraction", "0.5"], "exclude each other"),
        (["--digital-memory-budget", "1MiB"], "too small"),
        (["--cost-config", str(tmp_path / "nope.json")], "cost config file not found"),
    ]
    for extra, message in cases:
        target = tmp_path / "bad.json"
        assert _rc(["place", str(DEMO), "--no-graph", "--out", str(target), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not target.exists()


def _rc(argv) -> int:
    """The exit code of the CLI (``main`` returns argparse's usage errors as codes too)."""
    return main(argv)


def test_export_cost_of_a_monolithic_export_is_all_digital(olmoe):
    from hetmoe_compile.analog.config import AnalogConfig
    from hetmoe_compile.export.exporter import ExportOptions, export_cost

    model, info = olmoe
    placement = place(model, info, _scores(info), PlacementPolicy(0.25))
    mono = export_cost(model, info, placement, ExportOptions(monolithic=True), AnalogConfig(tile_size=256))
    assert mono["analog_tiles"] == 0 and "monolithic" in mono["assumptions"]["export"]
    split = export_cost(
        model, info, placement, ExportOptions(cost=CostParams(batch_size=2)), AnalogConfig(tile_size=256)
    )
    assert split["assumptions"]["tile_size"] == 256 and split["assumptions"]["params"]["batch_size"] == 2
    assert split["energy_breakdown_j"]["analog_mvm"] == pytest.approx(2 * 6 * 0.25 * 2 * 256**2 * 0.205e-12, rel=1e-12)
    assert torch.is_tensor(next(model.parameters()))


@pytest.mark.parametrize("canonical", [False, True], ids=["original", "canonical"])
@pytest.mark.parametrize("family", FAMILIES)
def test_totals_book_every_parameter_once(family, canonical):
    """All digital: the footprint is the model's weight bytes. All analog: digital + analog = every parameter (an
    analog expert's biases are added digitally, so GPT-OSS's count as digital memory)."""
    model, info, _ = placed(family, canonical=canonical)
    wb = next(model.parameters()).element_size()
    total = sum(p.numel() for p in model.parameters())  # tied embeddings once
    routed = sum(p.numel() for layer in info.moe_layers for p in model.get_submodule(layer.experts).parameters())
    everything = place(model, info, _scores(info), PlacementPolicy(1.0))
    nothing = place(model, info, _scores(info), PlacementPolicy(0.0))
    digital = estimate_cost(model, everything, info=info)
    assert digital.digital_memory_bytes == total * wb and digital.analog_weights == 0
    assert estimate_cost(model, nothing, info=info, all_digital=True).digital_memory_bytes == total * wb
    analog = estimate_cost(model, nothing, info=info)
    assert analog.digital_memory_bytes // wb + analog.analog_weights == total
    matrices = sum(3 * layer.hidden_size * layer.intermediate_size * layer.num_experts for layer in info.moe_layers)
    assert analog.analog_weights == matrices
    if family == "gpt_oss":  # the case the cost model once dropped: 1,024 expert biases
        assert routed - matrices == 1024
