"""Per family: recognised, canonical parity (max-abs logits vs the original model over several splits) and
torch.export OK, on tiny random models built from configs."""

from __future__ import annotations

import sys
import time

import torch


def main() -> int:
    from hetmoe_compile.base.tables import format_table
    from hetmoe_compile.graph.capture import export_placed
    from hetmoe_compile.models import recognize
    from hetmoe_compile.models.tiny import TINY_CONFIGS, tiny_model
    from hetmoe_compile.placement import PlacementPolicy, place
    from hetmoe_compile.scoring import score
    from hetmoe_compile.transforms.canonicalize import canonicalize

    rows = []
    for family in sorted(TINY_CONFIGS):
        model = tiny_model(family)
        info = recognize(model)
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        worst = 0.0
        for fraction in (0.0, 0.125, 0.25, 0.5, 1.0):
            p = place(model, info, score(model, info, "max-neuron-norm"), PlacementPolicy(fraction))
            canonicalize(model, p.devices(), info)
            with torch.no_grad():
                worst = max(worst, (model(input_ids=ids).logits - ref).abs().max().item())
        t = time.perf_counter()
        try:
            ep = export_placed(model, p, info)
            with torch.no_grad():
                err = (ep.module()(ids, torch.ones_like(ids)) - ref).abs().max().item()
            export = f"OK ({time.perf_counter() - t:.1f}s, max-abs {err:.1e})"
        except Exception as exc:  # report, don't stop
            export = f"FAILED: {str(exc).splitlines()[0][:60]}"
        layers = ",".join(str(l.index) for l in info.moe_layers)
        rows.append([family, info.architecture, f"MoE layers {layers}", f"{worst:.1e}", export])
    print(format_table(["family", "architecture", "recognised", "parity max-abs", "torch.export"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
