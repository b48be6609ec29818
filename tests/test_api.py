"""The Python API: hetmoe_compile.compile / analyze / prepare and the CompiledMoE object."""

import json
import subprocess
import sys

import pytest
import torch

import hetmoe_compile as hc
from hetmoe_compile.models.tiny import tiny_model

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))


def test_public_names_are_listed_and_load_lazily():
    code = (
        "import sys, hetmoe_compile as hc; assert 'torch' not in sys.modules; "
        "print(sorted(n for n in hc.__all__ if not n.startswith('_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = eval(out)
    assert {"compile", "analyze", "prepare", "CompiledMoE", "PlacementPolicy", "analog_config", "export_onnx"} <= set(
        names
    )
    for name in names:
        obj = getattr(hc, name)
        assert obj.__doc__, name  # every public name is documented
    with pytest.raises(AttributeError):
        getattr(hc, "nothing_here")  # noqa: B009 (the attribute lookup is what is tested)


def test_compile_places_simulates_reports_and_exports(tmp_path):
    model = tiny_model("olmoe")
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
    compiled = hc.compile(model, hc.PlacementPolicy(digital_fraction=0.25), "pcm")
    assert compiled.model is model
    assert [len(l.ids("digital")) for l in compiled.placement.layers] == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, ref, rtol=0, atol=1e-5)
        noisy = compiled.simulate(seed=1)(input_ids=IDS, use_cache=False).logits
        again = compiled.simulate(seed=1)(input_ids=IDS, use_cache=False).logits
        other = compiled.simulate(seed=2)(input_ids=IDS, use_cache=False).logits
    assert (noisy - ref).abs().max() > 1e-2
    torch.testing.assert_close(noisy, again, rtol=0, atol=0)  # same seed, same instance
    assert (other - noisy).abs().max() > 1e-3
    report = compiled.report()
    assert "digital experts" in report and "share" in report
    manifest = compiled.export(tmp_path / "onnx", instance_seed=1)
    doc = json.loads(manifest.read_text())
    assert doc["analog"]["instance_seed"] == 1 and doc["placement"]["layers"] == compiled.placement.to_dict()["layers"]
    with torch.no_grad():  # export restored the ideal model
        torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, ref, rtol=0, atol=1e-5)


def test_analyze_returns_the_score_table():
    model = tiny_model("mixtral")
    analysis = hc.analyze(model)
    assert set(analysis.scores) == {"max-neuron-norm", "router-norm", "random"}
    table = analysis.table(0.25)
    assert "top 2 by max-neuron-norm" in table and "rho(router-norm)" in table
    with pytest.raises(hc.HetMoEError, match="pass --calib TEXTFILE|calibration"):
        hc.analyze(model, ["activation-frequency"])


def test_compile_rejects_bad_input():
    model = tiny_model("olmoe")
    with pytest.raises(hc.HetMoEError, match="unknown noise preset 'loud'"):
        hc.compile(model, analog="loud")
    with pytest.raises(hc.HetMoEError):
        hc.compile(model, hc.PlacementPolicy(digital_fraction=1.5))


def test_compile_places_under_a_budget_with_the_measured_routing():
    """The composer reaches what only the CLI could: an energy budget costed with the calibration's routing."""
    from hetmoe_compile.compose.pipeline import place_scores, routing_frequencies
    from hetmoe_compile.cost import estimate_cost, load_cost_params
    from hetmoe_compile.scoring import score

    calib = hc.Calibration(torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3)))
    params = load_cost_params(None)
    model = tiny_model("olmoe")
    info = hc.recognize(model)
    frequencies = routing_frequencies(model, info, calib)
    scores = score(model, info, "max-neuron-norm")

    def energy(fraction: float) -> float:
        placement = place_scores(model, info, scores, hc.PlacementPolicy(fraction))
        return estimate_cost(model, placement, params, info=info, frequencies=frequencies).energy_per_token_j

    low, high = energy(0.0), energy(1.0)
    for share in (0.2, 0.35, 0.5, 0.65, 0.8):  # a budget where the measured routing changes what fits
        policy = hc.PlacementPolicy(energy_budget=low + share * (high - low))
        measured = place_scores(model, info, scores, policy, cost_params=params, frequencies=frequencies)
        if measured.devices() != place_scores(model, info, scores, policy, cost_params=params).devices():
            break
    else:
        pytest.fail("no budget in the span where measured and uniform routing place differently")
    compiled = hc.compile(model, policy, "pcm", calib, cost_params=params)
    assert compiled.placement.devices() == measured.devices()
    assert compiled.placement.cost["energy_per_token_j"] <= policy.energy_budget


def test_compile_quantises_and_applies_peers_and_takes_them_back():
    model = tiny_model("olmoe")
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
    compiled = hc.compile(model, hc.PlacementPolicy(0.5), "pcm", digital_bits=8, group_size=16)
    assert compiled.quantization["bits"] == 8 and len(compiled.quantization["experts"]) == 8  # 4 per layer
    with torch.no_grad():
        quantised = model(input_ids=IDS, use_cache=False).logits
    assert 0 < (quantised - ref).abs().max() < 0.05
    with pytest.raises(hc.HetMoEError, match="digital_bits and the int8/int4 peers both quantise"):
        hc.compile(tiny_model("olmoe"), hc.PlacementPolicy(0.5), digital_bits=8, peers=["int4"])
    other = tiny_model("olmoe")
    compiled = hc.compile(other, hc.PlacementPolicy(0.5), "pcm", peers=["hpd"])
    assert "hpd" in compiled.peers.record
    compiled.undo_peers()
    assert compiled.peers is None
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=IDS, use_cache=False).logits, ref, rtol=0, atol=1e-5)


def test_compile_checks_a_given_placement_against_the_model():
    placement = hc.compile(tiny_model("olmoe"), hc.PlacementPolicy(0.25)).placement
    again = hc.compile(tiny_model("olmoe"), placement=placement)
    assert again.placement.devices() == placement.devices()
    with pytest.raises(hc.HetMoEError, match=r"p.json: placement was made for another model"):
        hc.compile(tiny_model("mixtral"), placement=placement, source="p.json")


def test_simulate_in_a_fresh_process_registers_the_analog_op():
    """The analog op must be registered by the modules that call it, not by whatever a test imported first."""
    code = (
        "import torch, hetmoe_compile as hc; from hetmoe_compile.models.tiny import tiny_model; "
        "c = hc.compile(tiny_model('olmoe'), hc.PlacementPolicy(0.25), 'pcm'); "
        "print(c.simulate(0)(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False).logits.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3, 128])" in out.stdout
