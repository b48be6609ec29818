"""Constant noise management with input ranges calibrated on text (aihwkit's NoiseManagementType.CONSTANT with
pre_post.input_range, and its calibrate_input_ranges): the calibration, the tiles against aihwkit, both expert-group
paths, the graph pass, the ONNX instance partitions, the standard-hwa preset and the command line."""

import json
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import DEMO, FAMILIES, REPO, norm_rel_err, placed, token_ids

from hetmoe_compile.analog import analog_config, analog_matmul, program_matrix, restore_digital, simulate
from hetmoe_compile.analog.aihwkit_reference import aihwkit_linear, native_tile_forward
from hetmoe_compile.analog.input_ranges import (
    MIN_ROWS,
    InputRanges,
    attach_input_ranges,
    attached_input_ranges,
    calibrate_input_ranges,
    tile_quantiles,
)
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main
from hetmoe_compile.export import ExportOptions, export_onnx
from hetmoe_compile.ir.expert_group import activate
from hetmoe_compile.models.calibration import Calibration
from hetmoe_compile.transforms.canonicalize import canonicalize

IDS = token_ids(2, 9)
NOISE_FREE = dict(programming_noise=False, drift=False, drift_compensation=False, out_noise=0.0, w_noise=0.0)


def _calibrated(family: str = "olmoe", tile_size: int = 16, tokens: int = 96):
    model, info, placement = placed(family)
    cal = Calibration(token_ids(3, tokens // 3, model.config.vocab_size, seed=5), "random ids")
    ranges = calibrate_input_ranges(model, info, cal, tile_size)
    attach_input_ranges(model, ranges, info)
    return model, info, placement, cal, ranges


# ---- calibration --------------------------------------------------------------------------------------------


def test_tile_quantiles_are_torch_quantile_per_tile_without_padding_or_zero_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 40, generator=gen)
    x[5] = 0.0  # an all-zero row is left out, as aihwkit's calibration hook does
    got = tile_quantiles(x, 16, 0.99)
    keep = x[(x != 0).any(-1)].abs()
    assert got.shape == (3,)  # 40 inputs on 16-wide tiles: 3 tiles of 14, the last with 2 padded inputs
    for c, (lo, hi) in enumerate([(0, 14), (14, 28), (28, 40)]):
        assert got[c].item() == pytest.approx(torch.quantile(keep[:, lo:hi].reshape(-1), 0.99).item(), rel=1e-6)
    assert tile_quantiles(x, 64, 1.0).item() == pytest.approx(x.abs().max().item())


def test_calibrated_ranges_are_the_quantile_of_each_experts_routed_inputs():
    """gate_up: the routed tokens' hidden states; down: the expert's activations on them; an expert routed fewer
    than MIN_ROWS tokens is calibrated on all of the layer's tokens (recorded)."""
    model, info, _, cal, ranges = _calibrated()
    routing = cal.routing(model, info)
    layer = info.moe_layers[1]
    cap = routing[layer.index]
    lr = ranges.layers[layer.index]
    groups = list(model.get_submodule(layer.experts).groups.values())
    checked = 0
    for group in groups:
        for local, e in enumerate(group.ids):
            rows = (cap.top_k_index == e).any(-1)
            assert lr.rows[e] == int(rows.sum())
            x = cap.hidden[rows] if rows.sum() >= MIN_ROWS else cap.hidden
            gate_up, _, bias, _ = group.expert(local)
            h = activate(torch.nn.functional.linear(x, gate_up, bias), group.activation, group.act_name, 0.0, 0.0)
            torch.testing.assert_close(lr.gate_up[e], tile_quantiles(x, 16, ranges.quantile))
            torch.testing.assert_close(lr.down[e], tile_quantiles(h, 16, ranges.quantile))
            assert (e in lr.all_tokens) == (rows.sum() < MIN_ROWS)
            checked += 1
    assert checked == layer.num_experts and bool((lr.gate_up > 0).all())
    again = calibrate_input_ranges(model, info, cal, 16)
    assert again.digest == ranges.digest  # deterministic: every routed row, no random subset


def test_ranges_file_round_trip_and_bad_files(tmp_path):
    model, info, _, _, ranges = _calibrated()
    path = ranges.save(tmp_path / "ranges.json")
    assert InputRanges.load(path).digest == ranges.digest
    doc = json.loads(path.read_text())
    bad = {
        "format": ({**doc, "format": "other"}, "not an input-ranges file"),
        "negative": (
            {**doc, "layers": {**doc["layers"], "0": {**doc["layers"]["0"], "down": [[-1.0]] * 8}}},
            "must be > 0",
        ),
        "malformed": ({**doc, "tile_size": "wide"}, "malformed"),
    }
    for name, (data, message) in bad.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        with pytest.raises(HetMoEError, match=message):
            InputRanges.load(tmp_path / f"{name}.json")
    with pytest.raises(HetMoEError, match="not found"):
        InputRanges.load(tmp_path / "missing.json")
    with pytest.raises(HetMoEError, match="calibrated for 16-wide tiles"):
        simulate(model, analog_config("standard-hwa"), 0, info=info)  # the preset's 512-wide tiles
    assert all(
        type(g).__name__ == "ExpertGroup" for g in model.get_submodule(info.moe_layers[0].experts).groups.values()
    )
    one_layer = replace(ranges, layers={0: ranges.layers[0]})
    with pytest.raises(HetMoEError, match="no MoE layer 1"):
        attach_input_ranges(model, one_layer, info)


# ---- the tiles against aihwkit ---------------------------------------------------------------------------------


def test_constant_noise_management_equals_aihwkits_pytorch_tile_with_input_ranges():
    """Noise-free, DAC and ADC on, three input tiles and ranges that clip some inputs: aihwkit's PyTorch tile with
    NoiseManagementType.CONSTANT and per-tile input ranges, output for output (a float32 rounding tie aside)."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(100, 150, generator=gen) * 0.1, torch.randn(40, 150, generator=gen)
    ranges = torch.tensor([1.5, 2.0, 0.7])  # the last clips about half the inputs of its tile
    cfg = analog_config("dac-adc", tile_size=64, out_noise=0.0, noise_management="constant")
    ours = analog_matmul(x, program_matrix(w, cfg, 0), cfg, None, ranges)
    with torch.no_grad():
        theirs = aihwkit_linear(w, cfg, 0, ranges)(x)
    assert (ours - theirs).abs().gt(1e-5).sum() <= 2
    native = native_tile_forward(x.numpy(), w.numpy(), cfg, None, ranges.numpy())
    np.testing.assert_allclose(theirs.numpy(), native, atol=1e-5)
    abs_max = analog_config("dac-adc", tile_size=64, out_noise=0.0)
    assert not torch.allclose(ours, analog_matmul(x, program_matrix(w, abs_max, 0), abs_max), atol=1e-3)


@pytest.mark.parametrize("effects", ["pcm", "standard-hwa periphery"])
def test_constant_noise_management_agrees_with_aihwkit_in_relative_mvm_error(effects):
    """20 instances (pcm devices, aihwkit's PyTorch tile) or 20 MVMs (IR drop and weight noise on exact devices,
    the transcription of its C++ forward): mean relative MVM error within 5 %, ranges at aihwkit's quantile."""
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(192, 700, generator=gen) * 0.05, torch.randn(48, 700, generator=gen)
    ranges = tile_quantiles(torch.randn(512, 700, generator=gen), 512, 0.99995)
    ref = x @ w.T
    ours, theirs = [], []
    if effects == "pcm":
        cfg = analog_config("pcm", noise_management="constant")
        for seed in range(20):
            y = analog_matmul(x, program_matrix(w, cfg, seed), cfg, torch.Generator().manual_seed(seed), ranges)
            ours.append(norm_rel_err(y, ref))
            with torch.no_grad():
                theirs.append(norm_rel_err(aihwkit_linear(w, cfg, seed, ranges)(x), ref))
    else:
        cfg = analog_config("dac-adc", ir_drop=1.0, w_noise=0.0175, noise_management="constant")
        prog, mvm, rng = program_matrix(w, cfg, 0), torch.Generator().manual_seed(0), np.random.default_rng(0)
        for _ in range(20):
            ours.append(norm_rel_err(analog_matmul(x, prog, cfg, mvm, ranges), ref))
            native = native_tile_forward(x.numpy(), w.numpy(), cfg, rng, ranges.numpy())
            theirs.append(norm_rel_err(torch.from_numpy(native).float(), ref))
    assert abs(np.mean(ours) / np.mean(theirs) - 1) < 0.05, (np.mean(ours), np.mean(theirs))


# ---- simulation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_both_expert_group_paths_agree_and_the_graph_pass_matches_eager(family, monkeypatch):
    """Constant noise management with bound management (noise-free, so deterministic): the per-expert loop and the
    grouped GEMM path give the same logits; the rewrite_analog pass with the same ranges equals eager simulation."""
    from hetmoe_compile.graph.capture import export_placed
    from hetmoe_compile.graph.passes import RewriteAnalogPass

    model, info, placement, _, ranges = _calibrated(family)
    cfg = analog_config("standard-hwa", tile_size=16, **NOISE_FREE, out_bound=2.0, bound_management="iterative")
    out = {}
    with torch.no_grad():
        clean = model(input_ids=IDS).logits
        for grouped in ("0", "1"):
            monkeypatch.setenv("HETMOE_GROUPED_MM", grouped)
            simulate(model, cfg, seed=0, info=info)
            out[grouped] = model(input_ids=IDS).logits
        restore_digital(model, info)
    torch.testing.assert_close(out["0"], out["1"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["0"], clean, atol=1e-4)
    noisy = analog_config("standard-hwa", tile_size=16)
    gm = export_placed(model, placement, info).module()
    with pytest.raises(Exception, match="needs input ranges"):
        RewriteAnalogPass(noisy, seed=3)(gm)
    rewritten = RewriteAnalogPass(noisy, seed=3, input_ranges=ranges)(gm).graph_module
    simulate(model, noisy, seed=3, info=info)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(IDS, torch.ones_like(IDS)), model(input_ids=IDS).logits, rtol=0, atol=0)
    restore_digital(model, info)


def test_standard_hwa_needs_ranges_and_keeps_them_across_placements():
    model, info, placement = placed("qwen2_moe")
    cfg = analog_config("standard-hwa", tile_size=16)
    with pytest.raises(HetMoEError, match="needs input ranges calibrated on text"):
        simulate(model, cfg, 0, info=info)
    cal = Calibration(token_ids(3, 32, model.config.vocab_size, seed=5))
    ranges = calibrate_input_ranges(model, info, cal, 16)
    attach_input_ranges(model, ranges, info)
    canonicalize(model, {l.index: {e: "analog" for e in range(l.num_experts)} for l in info.moe_layers}, info)
    assert attached_input_ranges(model) is ranges  # the ranges belong to the model, not to one split
    simulate(model, cfg, 0, info=info)
    with pytest.raises(HetMoEError, match="calibration runs on the digital model"):
        calibrate_input_ranges(model, info, cal, 16)
    with pytest.raises(HetMoEError, match="dense layers on tiles"):
        simulate(model, cfg, 0, dense="analog", info=info)
    restore_digital(model, info)
    assert not cfg.is_ideal and not replace(cfg, **NOISE_FREE, ir_drop=0.0, dac_bits=0, adc_bits=0).is_ideal


# ---- export ------------------------------------------------------------------------------------------------


def test_instance_partition_reproduces_constant_noise_management(tmp_path):
    """Given the simulation's own inputs, the instance partition with calibrated ranges (and with bound management
    on top) equals the PyTorch op; the manifest carries every expert's ranges; without ranges export refuses."""
    model, info, placement, _, ranges = _calibrated(tile_size=16)
    base = analog_config("standard-hwa", tile_size=16, out_noise=0.0, w_noise=0.0)
    for name, cfg in [("constant", base), ("managed", replace(base, out_bound=2.0, bound_management="iterative"))]:
        out = tmp_path / name
        export_onnx(model, placement, out, ExportOptions(analog=cfg, instance_seed=7, progress=False))
        simulate(model, cfg, seed=7, info=info)
        seen: dict = {}
        group = model.get_submodule(info.moe_layers[1].experts).groups["analog"]
        handle = group.register_forward_hook(
            lambda m, a, y, seen=seen: seen.update(args=[t.clone() for t in a], y=y.clone())
        )
        try:
            with torch.no_grad():
                model(input_ids=token_ids(2, 16), use_cache=False)
        finally:
            handle.remove()
            restore_digital(model, info)
        sess = ort.InferenceSession(str(out / "analog_L1.instance.onnx"))
        feeds = dict(zip(["hidden_states", "top_k_index", "top_k_weights"], (a.numpy() for a in seen["args"])))
        got = sess.run(None, feeds)[0]
        off = np.abs(got - seen["y"].numpy()).max(-1) > 1e-5  # per token: a DAC/ADC rounding tie at most
        assert off.sum() <= 1, (name, int(off.sum()))
        doc = json.loads((out / "manifest.json").read_text())
        assert doc["analog"]["config"]["noise_management"] == "constant"
        assert InputRanges.from_dict(doc["analog"]["input_ranges"]).digest == ranges.digest
    attach_input_ranges(model, None)
    with pytest.raises(HetMoEError, match="needs input ranges"):
        export_onnx(model, placement, tmp_path / "none", ExportOptions(analog=base, instance_seed=7, progress=False))
    assert not (tmp_path / "none").exists()


# ---- command line ---------------------------------------------------------------------------------------------


def test_cli_calibrates_ranges_and_evaluates_standard_hwa(tmp_path, capsys):
    calib = str(REPO / "examples" / "calibration.txt")
    ranges = tmp_path / "ranges.json"
    assert main(["calibrate-ranges", str(DEMO), "--calib", calib, "--calib-tokens", "512", "--out", str(ranges)]) == 0
    doc = json.loads(ranges.read_text())
    assert doc["model"]["config_sha256"] and doc["tokens"] == 512 and doc["quantile"] == 0.99995
    common = ["eval", str(DEMO), "--digital-fraction", "0.25", "--seeds", "1", "--ppl", calib, "--ppl-tokens", "256"]
    out = tmp_path / "res.json"
    assert main([*common, "--noise", "standard-hwa", "--input-ranges", str(ranges), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["input_ranges"]["sha256"] == InputRanges.load(ranges).digest
    assert res["analog"]["noise_management"] == "constant" and res["metrics"]["ppl"]["mean"] > 1
    out2 = tmp_path / "res2.json"  # calibrated on the fly on the same tokens: the same ranges and numbers
    assert (
        main([*common, "--noise", "standard-hwa", "--calib", calib, "--calib-tokens", "512", "--out", str(out2)]) == 0
    )
    res2 = json.loads(out2.read_text())
    assert res2["input_ranges"]["sha256"] == res["input_ranges"]["sha256"]
    assert res2["metrics"]["ppl"] == res["metrics"]["ppl"]
    capsys.readouterr()
    assert main([*common, "--noise", "standard-hwa", "--out", str(tmp_path / "x.json")]) == 2
    assert "needs input ranges calibrated on text" in capsys.readouterr().err
    assert main([*common, "--input-ranges", str(ranges), "--out", str(tmp_path / "x.json")]) == 2
    assert "--input-ranges apply to constant noise management" in capsys.readouterr().err
    doc["model"]["config_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(doc))
    bad = [*common, "--noise", "standard-hwa", "--input-ranges", str(tmp_path / "other.json")]
    assert main([*bad, "--out", str(tmp_path / "x.json")]) == 2
    assert "calibrated on another model" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_sweep_under_constant_noise_management_leaves_out_the_dense_on_tiles_rows(tmp_path, capsys):
    """standard-hwa in a sweep: ranges calibrated on --calib, every row with dense modules on tiles (all-analog,
    the ablation) left out with a line saying why, the rest evaluated."""
    calib = str(REPO / "examples" / "calibration.txt")
    out = tmp_path / "sweep"
    argv = ["sweep", str(DEMO), "--fractions", "0.25", "--selectors", "max-neuron-norm", "--noise", "standard-hwa"]
    argv += ["--calib", calib, "--calib-tokens", "512", "--seeds", "1", "--ppl", calib, "--ppl-tokens", "256"]
    assert main([*argv, "--routing-tokens", "0", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["all-digital", "dense-digital", "max-neuron-norm 0.25"]
    assert doc["input_ranges"]["origin"] == "calibrated on --calib"
    assert "constant noise management has input ranges for routed experts only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "calibrate-ranges needs calibration text: add --calib TEXTFILE"),
        (["--calib", str(REPO / "examples" / "calibration.txt"), "--quantile", "0.3"], "give a quantile in [0.5, 1]"),
    ],
)
def test_calibrate_ranges_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "ranges.json"
    assert main(["calibrate-ranges", str(DEMO), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_export_refuses_ranges_of_another_tile_width_before_writing(tmp_path):
    model, info, placement, _, _ = _calibrated(tile_size=16)
    cfg = analog_config("standard-hwa", tile_size=32)
    with pytest.raises(HetMoEError, match="calibrated for 16-wide tiles"):
        export_onnx(model, placement, tmp_path / "x", ExportOptions(analog=cfg, instance_seed=0, progress=False))
    assert not (tmp_path / "x").exists()
