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
    code = ("import sys, hetmoe_compile as hc; assert 'torch' not in sys.modules; "
            "print(sorted(n for n in hc.__all__ if not n.startswith('_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = eval(out)
    assert {"compile", "analyze", "prepare", "CompiledMoE", "PlacementPolicy", "analog_config", "export_onnx"} <= set(
        names)
    for name in names:
        obj = getattr(hc, name)
        assert obj.__doc__, name  # every public name is documented
    with pytest.raises(AttributeError):
        hc.nothing_here


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
