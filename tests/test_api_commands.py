"""The Python API covers the commands (issue 32): each public function returns an object whose ``to_dict()`` is
the file the CLI writes and whose ``save(path)`` writes it; the numbers are the CLI's."""

import json
import math

import pytest
from helpers import DEMO, REPO

import hetmoe_compile as hc
from hetmoe_compile.cli import main

TEXT = REPO / "examples" / "calibration.txt"


def _calibration(tokens: int = 512):
    return hc.calibration_from_text(hc.load_tokenizer(str(DEMO)), TEXT.read_text(), max_tokens=tokens, source=str(TEXT))


def _without_times(doc: dict) -> dict:
    """``doc`` without wall-clock seconds (the only values two runs may differ in)."""
    doc = json.loads(json.dumps(doc))
    for s in doc.get("selectors", {}).values():
        s.pop("seconds", None)
    if doc.get("calibration"):
        doc["calibration"].pop("forward_seconds", None)
    return doc


def test_analyze_is_scores_json(tmp_path):
    assert (
        main(["analyze", str(DEMO), "--calib", str(TEXT), "--calib-tokens", "512", "--out", str(tmp_path / "a")]) == 0
    )
    cli = json.loads((tmp_path / "a" / "scores.json").read_text())
    analysis = hc.analyze(hc.load_model(str(DEMO)), calibration=_calibration(), source=str(DEMO))
    assert _without_times(analysis.to_dict()) == _without_times(cli)
    saved = analysis.save(tmp_path / "scores.json")
    assert _without_times(json.loads(saved.read_text())) == _without_times(cli)
    assert analysis.plot(tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_a_checkpoint_without_loading_it(tmp_path, no_model_load):
    """A checkpoint directory and data-free selectors: the scores come from the files (the model is never loaded)."""
    analysis = hc.analyze(str(DEMO), ["max-neuron-norm", "router-norm"])
    assert sorted(analysis.scores) == ["max-neuron-norm", "router-norm"]
    assert analysis.model["source"] == str(DEMO) and analysis.calibration is None
    with pytest.raises(hc.HetMoEError, match="load='meta' scores"):
        hc.analyze(str(DEMO), ["measured"], _calibration(), load="meta")


def test_an_undefined_correlation_is_null_not_nan(tmp_path):
    """A layer whose scores are all equal has no rank correlation: scores.json says null, valid strict JSON."""
    model = hc.load_model(str(DEMO))
    analysis = hc.analyze(model, ["max-neuron-norm", "random"])
    layer = next(iter(analysis.scores["random"].layers))
    analysis.scores["random"].layers[layer][:] = 1.0
    text = analysis.save(tmp_path / "scores.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in scores.json"))
    rho = doc["layers"][0]["spearman_vs_reference"]["random"]
    assert rho is None and math.isnan(analysis.spearman()["random"][layer])


def test_place_is_placement_json_with_its_cost(tmp_path):
    assert (
        main(["place", str(DEMO), "--digital-fraction", "0.125", "--no-graph", "--out", str(tmp_path / "p.json")]) == 0
    )
    cli = json.loads((tmp_path / "p.json").read_text())
    placement = hc.place(hc.load_model(str(DEMO)), hc.PlacementPolicy(0.125), source=str(DEMO))
    assert placement.cost is not None and placement.cost["energy_per_token_j"] > 0
    assert placement.to_dict() == cli
    assert hc.place(str(DEMO), hc.PlacementPolicy(0.125)).to_dict() == cli  # from the files, without loading


def test_calibrate_input_ranges_is_the_cli_file(tmp_path):
    out = tmp_path / "r.json"
    assert main(["calibrate-ranges", str(DEMO), "--calib", str(TEXT), "--calib-tokens", "512", "--out", str(out)]) == 0
    model = hc.load_model(str(DEMO))
    ranges = hc.calibrate_input_ranges(model, _calibration(), source=str(DEMO))
    assert ranges.to_dict() == json.loads(out.read_text())
    hc.attach_input_ranges(model, hc.InputRanges.load(out))  # the CLI's file attaches to the same model


def test_evaluate_is_results_json(tmp_path, demo_export):
    placement_path, _ = demo_export
    out = tmp_path / "res.json"
    argv = ["eval", str(DEMO), "--placement", str(placement_path), "--noise", "pcm", "--noise-scale", "2.5"]
    argv += ["--seeds", "2", "--ppl", str(TEXT), "--ppl-tokens", "300", "--routing-tokens", "256", "--out", str(out)]
    assert main(argv) == 0
    cli = json.loads(out.read_text())
    result = hc.evaluate(
        str(DEMO),
        hc.Placement.load(placement_path),
        analog=hc.analog_config("pcm", noise_scale=2.5),
        seeds=2,
        ppl_text=TEXT,
        ppl_tokens=300,
        routing_tokens=256,
        source=str(placement_path),
    )
    assert result.to_dict() == cli  # the perplexities bit-equal, every field the CLI records
    assert json.loads(result.save(tmp_path / "api.json").read_text()) == cli
    assert [p.name for p in result.plots(tmp_path / "api.json")] == ["api.routing.png"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "give exactly one of placement"),
        (dict(policy=hc.PlacementPolicy(0.25), tasks="piqa"), "tasks must be a list of names, got the string"),
        (dict(policy=hc.PlacementPolicy(0.25), peers="hpd"), "peers must be a list of names"),
        (dict(policy=hc.PlacementPolicy(0.25), routing_tokens=-1), "routing_tokens=-1 must be an integer >= 0"),
        (dict(policy=hc.PlacementPolicy(0.25)), "nothing to evaluate"),
        (dict(policy=hc.PlacementPolicy(0.25), ppl_text=TEXT, input_ranges="r.json"), "input_ranges apply to"),
        (dict(policy=hc.PlacementPolicy(0.25), ppl_text=TEXT, analog="standard-hwa"), "needs input ranges"),
        (
            dict(policy=hc.PlacementPolicy(0.25), ppl_text=TEXT, analog="standard-hwa", input_ranges="nope.json"),
            "nope.json not found",
        ),
        (dict(policy=hc.PlacementPolicy(0.25, "measured"), ppl_text=TEXT), "measures routing on text"),
    ],
)
def test_evaluate_checks_its_arguments_before_loading(no_model_load, kwargs, message):
    with pytest.raises(hc.HetMoEError, match=message):
        hc.evaluate(str(DEMO), **kwargs)


def test_load_options_refuse_what_they_would_ignore():
    with pytest.raises(hc.HetMoEError, match="max_memory and offload_folder go with device_map"):
        hc.LoadOptions(max_memory={"cpu": "1GiB"}).check()
    with pytest.raises(hc.HetMoEError, match="unknown device; use cpu, cuda, cuda:N or auto"):
        hc.LoadOptions(device="tpu").check()
    if not __import__("torch").cuda.is_available():
        with pytest.raises(hc.HetMoEError, match="device='cuda': CUDA is not available here"):
            hc.LoadOptions(device="cuda").check()


def test_export_takes_every_export_option(tmp_path):
    """``compile(...).export(dir, ExportOptions(...))``: the KV cache and the cost parameters reach the files."""
    from hetmoe_compile.cost import CostParams
    from hetmoe_compile.models.tiny import tiny_model

    compiled = hc.compile(tiny_model("olmoe"), hc.PlacementPolicy(0.25), "pcm")
    params = CostParams(analog_mac_energy_j=0.41e-12)
    options = hc.ExportOptions(kv_cache=True, cost=params, progress=False)
    manifest = json.loads(compiled.export(tmp_path / "onnx", options).read_text())
    assert any(t["name"].startswith("past_key_values.") for t in manifest["inputs"])
    assert (tmp_path / "onnx" / "genai_config.json").is_file()
    assert manifest["cost"]["assumptions"]["params"]["analog_mac_energy_j"] == 0.41e-12
    with pytest.raises(hc.HetMoEError, match="give kv_cache in the ExportOptions, not beside them"):
        compiled.export(tmp_path / "x", options, kv_cache=True)
