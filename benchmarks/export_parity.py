"""Parity of the partitioned ONNX export run by the torch-free runtime, per family and on the reference model.

ideal: runtime logits vs PyTorch with the same placement (canonical model, no noise), max |diff| / max |logit|;
also with ``--ort-moe`` (digital expert groups as com.microsoft::MoE).
instance: the ``--instance-seed`` variant vs the PyTorch simulation with the same seed and preset (pcm without
output noise, since ONNX Runtime draws that noise from its own generator). Targets 1e-4 and 1e-3. DAC and ADC
round to integer levels, so a 1e-7 difference upstream (float32 summation order) can move one value across a
rounding boundary: the instance column shows the worst position, and the share of positions within 1e-3.

    python benchmarks/export_parity.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from hetmoe_compile import runtime
from hetmoe_compile.analog.config import analog_config
from hetmoe_compile.analog.simulate import restore_digital, simulate
from hetmoe_compile.compose.pipeline import place_model
from hetmoe_compile.export import ExportOptions, export_onnx
from hetmoe_compile.models import load_model
from hetmoe_compile.models.tiny import TINY_CONFIGS, tiny_model
from hetmoe_compile.placement import PlacementPolicy

REF = Path(__file__).resolve().parents[2] / "shared" / "models" / "olmoe-ref"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def parity(name: str, model, seq: int, tmp: Path, converters: bool = True) -> list:
    cfg = (
        analog_config("pcm", out_noise=0.0)
        if converters
        else analog_config("pcm", out_noise=0.0, dac_bits=0, adc_bits=0)
    )
    placement = place_model(model, PlacementPolicy(digital_fraction=0.25))
    out = export_onnx(model, placement, tmp / name, ExportOptions(analog=cfg, instance_seed=11, progress=False)).parent
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits.float().numpy()
        simulate(model, cfg, seed=11)
        noisy = model(input_ids=ids, use_cache=False).logits.float().numpy()
        restore_digital(model)
    ideal = runtime.load(out, analog="ideal")(ids.numpy())
    fused_dir = export_onnx(model, placement, tmp / f"{name}-moe", ExportOptions(ort_moe=True, progress=False)).parent
    fused = runtime.load(fused_dir)(ids.numpy())
    instance = runtime.load(out, analog="instance")(ids.numpy())
    n_parts = len(runtime.read_manifest(out)["partitions"])
    per_position = np.abs(instance - noisy).max(-1) / np.abs(noisy).max()
    return [
        name,
        n_parts,
        _rel(ideal, clean),
        _rel(fused, clean),
        _rel(instance, noisy),
        float((per_position <= 1e-3).mean()),
        _rel(noisy, clean),
    ]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in sorted(TINY_CONFIGS):
            rows.append(parity(family, tiny_model(family), 16, Path(tmp)))
        if REF.is_dir():
            rows.append(parity("olmoe-ref (17.9 M)", load_model(str(REF)), 256, Path(tmp)))
            rows.append(
                parity("olmoe-ref, PCM weights without DAC/ADC", load_model(str(REF)), 256, Path(tmp), converters=False)
            )
    print(
        "| model | partitions | ideal vs PyTorch | ideal, `--ort-moe` | instance vs simulation (max) | "
        "positions within 1e-3 | (noise effect: simulation vs clean) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, ideal, fused, inst, within, effect in rows:
        print(f"| {name} | {n} | {ideal:.1e} | {fused:.1e} | {inst:.1e} | {100 * within:.1f} % | {effect:.1e} |")


if __name__ == "__main__":
    main()
