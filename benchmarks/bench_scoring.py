"""Scoring speed and selector agreement on the reference model (falls back to the demo model without ../shared).

Prints: max-neuron-norm time (fused, no copies) side by side with a naive per-expert implementation that copies
each expert out and builds its gate/up/down matrices, with the ratio; each selector's time; and per layer the
Spearman rank correlation of every selector with the `measured` oracle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from timing import timed

REPO = Path(__file__).resolve().parents[1]
REF = REPO.parent / "shared" / "models" / "olmoe-ref"
TEXT = REPO.parent / "shared" / "data" / "wikitext2-raw-test.txt"


def naive_max_neuron_norm(model, info):
    """Reference implementation: per expert, copy out gate/up/down as [out, in] and take max row norms."""
    out = {}
    for layer in info.moe_layers:
        experts = model.get_submodule(layer.experts)
        scores = []
        for e in range(layer.num_experts):
            gate_up = experts.gate_up_proj[e].detach().clone()
            down = experts.down_proj[e].detach().clone()
            gate, up = gate_up.chunk(2, dim=0)
            scores.append(float(gate.norm(dim=1).max() * up.norm(dim=1).max() * down.norm(dim=1).max()))
        out[layer.index] = scores
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(REF if REF.is_dir() else REPO / "examples" / "olmoe-demo"))
    ap.add_argument("--calib", default=str(TEXT) if TEXT.is_file() else None)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    from hetmoe_compile.base.tables import format_table
    from hetmoe_compile.compose.pipeline import analyze_model
    from hetmoe_compile.models import load_model, load_tokenizer, recognize
    from hetmoe_compile.models.calibration import calibration_from_file
    from hetmoe_compile.scoring import score, selectors

    torch.manual_seed(0)
    model = load_model(args.model)
    info = recognize(model)
    print(
        f"model: {args.model} ({info.architecture}, {len(info.moe_layers)} MoE layers x "
        f"{info.moe_layers[0].num_experts} experts, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params)"
    )
    fused = timed(lambda: score(model, info, "max-neuron-norm"), args.repeat)
    naive = timed(lambda: naive_max_neuron_norm(model, info), args.repeat)
    print()
    print(
        format_table(
            ["max-neuron-norm", "median ms", "ratio"],
            [
                ["fused (hetmoe-compile)", f"{fused * 1e3:.2f}", "1.00x"],
                ["naive per-expert copy", f"{naive * 1e3:.2f}", f"{naive / fused:.2f}x"],
            ],
        )
    )
    if not args.calib:
        print("\n(no calibration text: data-driven selectors skipped)")
        return 0
    calib = calibration_from_file(args.calib, load_tokenizer(args.model), max_tokens=args.calib_tokens)
    analysis = analyze_model(model, list(selectors()), calib, seed=0, info=info)
    print()
    print(
        format_table(["selector", "seconds (first run)"], [[n, f"{s.seconds:.3f}"] for n, s in analysis.scores.items()])
    )
    rho = analysis.spearman()
    rows = [[l.index] + [f"{rho[n][l.index]:+.3f}" for n in rho] for l in info.moe_layers]
    rows.append(["mean"] + [f"{sum(rho[n].values()) / len(rho[n]):+.3f}" for n in rho])
    source = Path(args.calib).name
    print(f"\nSpearman rank correlation with 'measured' ({calib.num_tokens} calibration tokens from {source}):")
    print(format_table(["layer"] + list(rho), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
