"""Low-bit digital experts: group-wise INT8/INT4 weights, error bounds, MatMulNBits export, CLI."""

import json

import onnx
import pytest
import torch
from helpers import DEMO, FAMILIES, max_rel_err

import hetmoe_compile as hc
from hetmoe_compile import runtime
from hetmoe_compile.cli.app import main
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.transforms.lowbit import QUANT_ATTR, error_bound, quantize_digital_experts, quantize_groupwise

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))


def _loop_quant(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric abs-max group-wise fake quantisation written out per row and group: the dequantised weights and
    each weight's half step (its largest allowed error)."""
    qmax = 2 ** (bits - 1) - 1
    deq, half = torch.empty_like(w), torch.empty_like(w)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], group):
            block = w[r, g : g + group]
            step = block.abs().max() / qmax
            deq[r, g : g + group] = torch.clamp(torch.round(block / step), -qmax, qmax) * step
            half[r, g : g + group] = step / 2
    return deq, half


def test_groupwise_quantisation_matches_a_loop_and_shrinks_with_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[3, :128] *= 50  # one large group must not coarsen the others
    errors = {}
    for bits in (4, 8):
        quant = quantize_groupwise(w, bits, 128)
        assert quant.q.dtype == torch.int8 and int(quant.q.abs().max()) == 2 ** (bits - 1) - 1
        deq, half = _loop_quant(w, bits, 128)
        torch.testing.assert_close(quant.dequantize(), deq, rtol=1e-6, atol=0)
        assert ((quant.dequantize() - w).abs() <= half * (1 + 1e-6)).all()  # every weight within half its step
        rel = float(torch.linalg.vector_norm(quant.dequantize() - w) / torch.linalg.vector_norm(w))
        worst = float(torch.linalg.vector_norm(half) / torch.linalg.vector_norm(w))
        assert 0 < rel <= worst and error_bound(quant, w) == pytest.approx(worst, rel=1e-5)
        errors[bits] = rel
    assert errors[8] < errors[4] / 8  # 16x finer steps (7 -> 127 levels): measured 17.8x smaller


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
    for i in range(digital_before.shape[0]):  # the digital experts hold exactly the fake-quantised weights
        torch.testing.assert_close(het.groups["digital"].gate_up[i], _loop_quant(digital_before[i], 4, 16)[0])
    for r in rows:
        assert 0 < r.gate_up_error <= r.gate_up_bound and 0 < r.down_error <= r.down_bound and r.output_error > 0
    assert getattr(het.groups["digital"], QUANT_ATTR) == {"bits": 4, "group_size": 16}
    with pytest.raises(ValueError, match="quantised already"):
        quantize_digital_experts(model, 4, 16)


@pytest.mark.parametrize("family, bits", [(f, 4 if i % 2 else 8) for i, f in enumerate(FAMILIES)])
def test_low_bit_experts_export_as_matmul_nbits_with_parity(family, bits, tmp_path):
    model = tiny_model(family)
    compiled = hc.compile(model, hc.PlacementPolicy(0.25))
    assert len(compiled.quantize_digital(bits, 16)) == sum(
        len(layer.ids("digital")) for layer in compiled.placement.layers
    )
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
    assert max_rel_err(got, ref) < 1e-5  # measured: 3.0e-7 to 4.2e-7 over the seven families


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
        str(DEMO.parent / "calibration.txt"),
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
    # argparse rejects it before anything runs
    assert main(["eval", str(DEMO), *common, "--digital-bits", "3", "--out", str(tmp_path / "x.json")]) == 2
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
