"""Export at scale: an OLMoE-1B-7B-shaped model (hidden 2048, 64 experts of width 1024, top-8) with 2 layers and
random weights; export time and peak RSS against the weights' size. Targets: <= 5 min, peak RSS <= 2x weights.

Each measurement runs in a fresh subprocess so peak RSS (``ru_maxrss``) belongs to that run alone.

    python benchmarks/bench_export_scale.py [--layers 2] [--instance-seed N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def child(layers: int, out: str, instance_seed: int | None) -> dict:
    import resource
    import time

    import torch
    from shapes import olmoe_1b_7b_config
    from transformers import OlmoeForCausalLM

    from hetmoe_compile.analog.config import analog_config
    from hetmoe_compile.compose.pipeline import place_model
    from hetmoe_compile.export import ExportOptions, export_onnx
    from hetmoe_compile.placement.policy import PlacementPolicy

    torch.manual_seed(0)
    cfg = olmoe_1b_7b_config(layers)
    t = time.perf_counter()
    with torch.no_grad():
        model = OlmoeForCausalLM(cfg).eval()
    build_s = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    placement = place_model(model, PlacementPolicy(digital_fraction=0.25))
    place_s = time.perf_counter() - t
    t = time.perf_counter()
    export_onnx(
        model, placement, out, ExportOptions(analog=analog_config("pcm"), instance_seed=instance_seed, progress=False)
    )
    export_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    files = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
    return {
        "layers": layers,
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": weights,
        "build_s": build_s,
        "place_s": place_s,
        "export_s": export_s,
        "rss_after_build": rss_model,
        "peak_rss": peak,
        "export_bytes": files,
        "instance": instance_seed is not None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--instance-seed", type=int, default=None)
    ap.add_argument("--out", default=None, help="export directory (default: a temporary one, removed)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.layers, args.out, args.instance_seed)))
        return
    with tempfile.TemporaryDirectory(prefix="hetmoe-scale-") as tmp:
        out = args.out or str(Path(tmp) / "export")
        cmd = [sys.executable, __file__, "--child", "--layers", str(args.layers), "--out", out]
        if args.instance_seed is not None:
            cmd += ["--instance-seed", str(args.instance_seed)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    gib = 2**30
    print(
        f"OLMoE-1B-7B-shaped, {res['layers']} layers, {res['params'] / 1e9:.2f} B params "
        f"({res['weights_bytes'] / gib:.2f} GiB fp32), instance variant: {res['instance']}"
    )
    print("| measure | value | target |\n|---|---:|---:|")
    print(f"| export time (torch.export -> ONNX -> partitions -> manifest) | {res['export_s']:.1f} s | <= 300 s |")
    print(f"| placement (max-neuron-norm scoring) | {res['place_s']:.1f} s | |")
    print(
        f"| peak RSS | {res['peak_rss'] / gib:.2f} GiB = {res['peak_rss'] / res['weights_bytes']:.2f}x weights "
        f"| <= 2x |"
    )
    print(f"| RSS after building the model | {res['rss_after_build'] / gib:.2f} GiB | |")
    print(f"| files written | {res['export_bytes'] / gib:.2f} GiB | |")


if __name__ == "__main__":
    main()
