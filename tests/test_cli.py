"""The CLI contract: analyze and place outputs, the printed table, and bad input (one line, exit 2, nothing written)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO
from scipy.stats import spearmanr

from hetmoe_compile.cli.app import main
from hetmoe_compile.models import load_model
from hetmoe_compile.placement import Placement, validate_placement


def _max_neuron_norm_by_hand(experts):
    """Per expert: the product over gate, up and down of the largest row (neuron) L2 norm, in float64."""
    gate_up, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
    inter = gate_up.shape[1] // 2
    norms = [gate_up[:, :inter], gate_up[:, inter:], down]
    return (norms[0].norm(dim=2).amax(1) * norms[1].norm(dim=2).amax(1) * norms[2].norm(dim=2).amax(1)).numpy()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(
        "The quick brown fox jumps over the lazy dog. " * 40 + "To be, or not to be, that is the question. " * 40
    )
    return path


def test_analyze_writes_scores_plot_and_table(tmp_path, calib, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(DEMO), "--out", str(out), "--calib", str(calib), "--calib-tokens", "512"]) == 0
    doc = json.loads((out / "scores.json").read_text())
    assert set(doc["selectors"]) == {
        "max-neuron-norm",
        "router-norm",
        "random",
        "activation-frequency",
        "activation-weight",
        "expected-damage",
        "measured",
    }
    assert doc["reference"] == "measured"
    need = {n: s["calibration_tokens"] for n, s in doc["selectors"].items()}
    assert need["max-neuron-norm"] == 0 and need["expected-damage"] == need["measured"] == 512
    assert doc["calibration"]["tokens"] == 512 and doc["calibration"]["forward_seconds"] > 0
    assert len(doc["layers"]) == 4 and len(doc["layers"][0]["experts"]) == 16
    assert set(doc["layers"][0]["spearman_vs_reference"]) == set(doc["selectors"]) - {"measured"}
    for layer in doc["layers"]:  # scipy's Spearman (average ranks for ties) on the written scores; measured: 1e-16
        scores = {name: [e["scores"][name] for e in layer["experts"]] for name in doc["selectors"]}
        for name, rho in layer["spearman_vs_reference"].items():
            assert rho == pytest.approx(spearmanr(scores[name], scores["measured"]).statistic, abs=1e-12), name
    png = (out / "scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    printed = capsys.readouterr().out
    assert "top 4 by max-neuron-norm" in printed and "rho(router-norm)" in printed
    assert "(calibration forward, shared)" in printed and "calibration tokens" in printed
    assert str(out / "scores.json") in printed


def test_analyze_without_calib_runs_data_free_selectors(tmp_path):
    out = tmp_path / "a"
    assert main(["analyze", str(DEMO), "--out", str(out), "--selector", "max-neuron-norm"]) == 0
    doc = json.loads((out / "scores.json").read_text())
    assert list(doc["selectors"]) == ["max-neuron-norm"]
    model = load_model(str(DEMO))
    assert [l["index"] for l in doc["layers"]] == [0, 1, 2, 3]
    for layer in doc["layers"]:  # measured: within 1.8e-7 of the float64 reference (float32 reductions)
        got = [e["scores"]["max-neuron-norm"] for e in layer["experts"]]
        np.testing.assert_allclose(got, _max_neuron_norm_by_hand(model.get_submodule(layer["module"])), rtol=1e-6)


def test_place_writes_valid_placement_and_prints_report(tmp_path, capsys):
    out = tmp_path / "placement.json"
    rc = main(["place", str(DEMO), "--digital-fraction", "0.25", "--out", str(out), "--override", "0:3=digital"])
    assert rc == 0
    doc = json.loads(out.read_text())
    validate_placement(doc)
    layer0 = doc["layers"][0]["experts"]
    assert sum(e["device"] == "digital" for e in layer0) == 5  # ceil(0.25 * 16) + the override
    assert layer0[3]["device"] == "digital" and layer0[3]["reason"] == "override 0:3=digital"
    k = math.ceil(0.25 * 16)
    for layer in doc["layers"]:  # the k highest scores of each layer are digital, and nothing else but the override
        experts = layer["experts"]
        top = sorted(range(16), key=lambda e: -experts[e]["score"])[:k]
        expected = set(top) | ({3} if layer["index"] == 0 else set())
        assert {e["id"] for e in experts if e["device"] == "digital"} == expected
    assert Placement.load(out).policy.digital_fraction == 0.25
    printed = capsys.readouterr().out
    assert "graph nodes by kind" in printed and "parameters" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["place", "no/such/dir/model", "--out", "{out}/p.json"], "no such model directory"),
        (["place", str(DEMO), "--digital-fraction", "1.5", "--out", "{out}/p.json"], "outside [0, 1]"),
        (["place", str(DEMO), "--digital-fraction", "abc", "--out", "{out}/p.json"], "is not a number"),
        (["place", str(DEMO), "--selector", "magic", "--out", "{out}/p.json"], "valid selectors: max-neuron-norm"),
        (["place", str(DEMO), "--selector", "activation-frequency", "--out", "{out}/p.json"], "pass --calib TEXTFILE"),
        (["analyze", str(DEMO), "--selector", "measured", "--out", "{out}/a"], "pass --calib TEXTFILE"),
        (["analyze", str(DEMO), "--calib", "{out}/missing.txt", "--out", "{out}/a"], "calibration file not found"),
        (["analyze", str(DEMO), "--calib", "{empty}", "--out", "{out}/a"], "calibration text is empty"),
        (["place", str(DEMO), "--override", "0:99=digital", "--out", "{out}/p.json"], "no such MoE layer/expert"),
        (["place", "{nonmoe}", "--out", "{out}/p.json"], "has no MoE layer"),
        (["place", "{llama}", "--out", "{out}/p.json"], "is not supported; supported model types:"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, argv, message, capsys, nonmoe_dirs):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "out"
    argv = [a.format(out=out, empty=empty, **nonmoe_dirs) for a in argv]
    try:  # usage errors come back as exit code 2 (older parsers raised SystemExit(2))
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def nonmoe_dirs(tmp_path_factory):
    """A Qwen2-MoE directory whose layers are all dense, and a Llama directory (no adapter)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig

    root = tmp_path_factory.mktemp("models")
    small = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
    )
    dense = AutoModelForCausalLM.from_config(Qwen2MoeConfig(**small, mlp_only_layers=[0, 1], num_experts=4))
    dense.save_pretrained(root / "qwen2moe-dense")
    AutoModelForCausalLM.from_config(LlamaConfig(**small)).save_pretrained(root / "llama")
    return {"nonmoe": str(root / "qwen2moe-dense"), "llama": str(root / "llama")}


def test_console_script_reports_exit_code_2(tmp_path):
    exe = Path(sys.executable).with_name("hetmoe-compile")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hetmoe_compile"]
    res = subprocess.run(
        cmd + ["place", str(tmp_path / "nope"), "--out", str(tmp_path / "p.json")], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"hetmoe-compile place: error: {tmp_path / 'nope'}: no such model directory; give an existing directory "
        "or a hub id like 'owner/name'"
    ]
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(
    "message, shown",
    [
        (
            "input_ranges apply to constant noise management: set noise_management='constant'",
            "--input-ranges apply to constant noise management: set --noise-management constant",
        ),
        ("routing_tokens=-1 must be an integer >= 0", "--routing-tokens -1 must be an integer >= 0"),
        ("settings differ (noise_scale: 2.5 there, 8.0 here)", "settings differ (--noise-scale: 2.5 there, 8.0 here)"),
        ("shards one model: use device_map alone", "shards one model: use --device-map alone"),
        ("x.onnx holds instance_seed 5, the manifest claims 6", "x.onnx holds instance_seed 5, the manifest claims 6"),
        ("attribute hetmoe_input_ranges of model.input_ranges", "attribute hetmoe_input_ranges of model.input_ranges"),
    ],
)
def test_library_errors_name_the_flags_where_they_name_an_argument(message, shown):
    from hetmoe_compile.cli.app import as_flags

    assert as_flags(message) == shown
