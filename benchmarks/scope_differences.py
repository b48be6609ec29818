"""One digital budget over all layers (``--scope global``) against the same fraction in every layer, from the
placement-evidence sweeps (``make placement-evidence``): for each selector and fraction, both placements' mean
perplexity and the per-seed difference (global - per-layer; negative = the global budget is better), with its
std over seeds and how many seeds the global placement won. Seed s programs the same devices in both sweeps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> int:
    from hetmoe_compile.base.tables import format_table

    if len(argv) != 2:
        print("usage: scope_differences.py PER_LAYER/results.json GLOBAL/results.json")
        return 2
    docs = [json.loads(Path(p).read_text()) for p in argv]
    per, glob = (
        {(r["selector"], r["digital_fraction"]): np.array(r["metrics"]["ppl"]["values"]) for r in d["rows"]}
        for d in docs
    )
    fractions = sorted({f for s, f in glob if s != "-"})
    selectors = list(dict.fromkeys(s for s, _ in glob if s != "-"))
    rows = []
    for sel in selectors:
        cells = [sel]
        for f in fractions:
            d = glob[(sel, f)] - per[(sel, f)]
            cells += [f"{per[(sel, f)].mean():.2f}", f"{glob[(sel, f)].mean():.2f}"]
            cells.append(f"{d.mean():+.2f} ± {d.std():.2f} ({int((d < 0).sum())}/{len(d)})")
        rows.append(cells)
    head = ["selector"]
    for f in fractions:
        head += [f"per-layer {f:g}", f"global {f:g}", f"global - per-layer, {f:g}"]
    scale = docs[1]["analog"]["noise_scale"]
    print(f"\n{argv[1]}: pcm x{scale:g}, {docs[1]['seeds']} seeds; perplexity per scope and the paired difference")
    print(format_table(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
