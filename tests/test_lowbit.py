"""Low-bit digital experts: group-wise INT8/INT4 weights, error bounds, MatMulNBits export, CLI."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import hetmoe_compile as hc
from hetmoe_compile import runtime
from hetmoe_compile.cli import main
from hetmoe_compile.lowbit import QUANT_ATTR, error_bound, quantize_digital_experts, quantize_groupwise
from hetmoe_compile.models.tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "olmoe-demo"
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))


def test_groupwise_error_is_within_its_bound_and_shrinks_with_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[3, :128] *= 50  # one large group must not coarsen the others
    errors = {}
    for bits in (4, 8):
        quant = quantize_groupwise(w, bits, 128)
        assert quant.q.dtype == torch.int8 and int(quant.q.abs().max()) == 2 ** (bits - 1) - 1
        rel = float(torch.linalg.vector_norm(quant.dequantize() - w) / torch.linalg.vector_norm(w))
        assert 0 < rel <= error_bound(quant, w)
        errors[bits] = rel
    assert errors[8] < errors[4] / 8


def test_bad_bits_and_group_sizes_say_what_fits():
    w = torch.randn(8, 96)
    with pytest.raises(hc.HetMoEError, match="supports 4 and 8 bits, got 3"):
        quantize_groupwise(w, 3, 32)
    with pytest.raises(
        hc.HetMoEError, match="group size 64 does not divide the 96 inputs of matrix; sizes that fit: 16, 32"
    ):
        quantize_groupwise(w, 4, 64)


def test_quantize_digital_experts_touches_only_digital_weights():
    model = tiny_model("olmoe")
    compiled = hc.compile(model, hc.PlacementPolicy(0.25))
    het = model.get_submodule("model.layers.0.mlp.experts")
    analog_before = het.groups["analog"].gate_up.clone()
    digital_before = het.groups["digital"].gate_up.clone()
    rows = quantize_digital_experts(model, 4, 16)
    assert len(rows) == sum(len(l.ids("digital")) for l in compiled.placement.layers)
    assert torch.equal(het.groups["analog"].gate_up, analog_before)
    assert not torch.equal(het.groups["digital"].gate_up, digital_before)
    for r in rows:
        assert 0 < r.gate_up_error <= r.gate_up_bound and 0 < r.down_error <= r.down_bound and r.output_error > 0
    assert getattr(het.groups["digital"], QUANT_ATTR) == {"bits": 4, "group_size": 16}
    with pytest.raises(ValueError, match="quantised already"):
        quantize_digital_experts(model, 4, 16)


@pytest.mark.parametrize("family, bits", [("olmoe", 4), ("gpt_oss", 8)])
def test_low_bit_experts_export_as_matmul_nbits_with_parity(family, bits, tmp_path):
    model = tiny_model(family)
    compiled = hc.compile(model, hc.PlacementPolicy(0.25))
    assert len(compiled.quantize_digital(bits, 16)) == 4
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits.numpy()
    out = compiled.export(tmp_path / "onnx").parent
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["contrib_ops"] == ["com.microsoft.MatMulNBits"]
    for p in doc["partitions"]:
        ops = [n.op_type for n in onnx.load(str(out / p["file"])).graph.node]
        experts = sum(len(v) for v in p["experts"].values()) if p["device"] == "digital" else 0
        assert ops.count("MatMulNBits") == 2 * experts
    got = runtime.load(out)(IDS.numpy())
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-4


def test_eval_and_export_cli_take_digital_bits(tmp_path, capsys):
    placement = tmp_path / "placement.json"
    assert main(["place", str(DEMO), "--out", str(placement), "--no-graph"]) == 0
    common = [
        "--placement",
        str(placement),
        "--noise",
        "ideal",
        "--seeds",
        "1",
        "--ppl",
        str(REPO / "examples" / "calibration.txt"),
        "--ppl-tokens",
        "256",
    ]
    assert main(["eval", str(DEMO), *common, "--out", str(tmp_path / "fp.json")]) == 0
    assert (
        main(
            [
                "eval",
                str(DEMO),
                *common,
                "--digital-bits",
                "8",
                "--group-size",
                "64",
                "--out",
                str(tmp_path / "int8.json"),
            ]
        )
        == 0
    )
    assert "digital experts quantised to INT8, groups of 64" in capsys.readouterr().out
    fp, int8 = (json.loads((tmp_path / f).read_text()) for f in ("fp.json", "int8.json"))
    assert fp["digital_quantization"] is None
    assert len(int8["digital_quantization"]["experts"]) == 16
    ratio = int8["metrics"]["ppl"]["mean"] / fp["metrics"]["ppl"]["mean"]
    assert ratio != 1.0 and abs(ratio - 1) < 0.02  # INT8 changes perplexity, by little
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects it before anything runs
        main(["eval", str(DEMO), *common, "--digital-bits", "3", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "invalid choice: 3 (choose from 4, 8)" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(DEMO),
                "--placement",
                str(placement),
                "--digital-bits",
                "4",
                "--group-size",
                "48",
                "--out",
                str(tmp_path / "onnx"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "group size 48 does not divide the 128 inputs" in err[0]
    assert "sizes that fit: 16, 32, 64, 128" in err[0]
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "x.json").exists()
