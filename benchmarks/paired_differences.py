"""Paired comparison of selectors from a sweep's results.json.

Seed s programs the same devices for an expert in every placement (common random numbers), so per-seed
differences between two placements at the same fraction isolate the choice of digital experts. Prints, per
fraction, each selector's mean perplexity and its mean difference to `random` (or to each selector of
``--against``; negative = better) with its std over seeds, and how many seeds it won.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> int:
    import argparse

    from hetmoe_compile.base.tables import format_table

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("paths", nargs="+", help="sweep results.json files")
    ap.add_argument("--against", default="random", help="comma-separated reference selectors (default random)")
    args = ap.parse_args(argv)
    for path in args.paths:
        doc = json.loads(Path(path).read_text())
        rows = [r for r in doc["rows"] if r["dense"] == "digital" and r["selector"] != "-"]
        fractions = sorted({r["digital_fraction"] for r in rows})
        selectors = list(dict.fromkeys(r["selector"] for r in rows))
        by = {(r["selector"], r["digital_fraction"]): np.array(r["metrics"]["ppl"]["values"]) for r in rows}
        scale = doc["analog"]["noise_scale"]
        scope = doc.get("scope", "per-layer")
        for ref in args.against.split(","):
            if (ref, fractions[0]) not in by:
                continue
            table = []
            for sel in selectors:
                cells = [sel] + [f"{by[(sel, f)].mean():.2f}" for f in fractions]
                for f in fractions:
                    d = by[(sel, f)] - by[(ref, f)]
                    cells.append(f"{d.mean():+.2f} ± {d.std():.2f} ({int((d < 0).sum())}/{len(d)})")
                table.append(cells)
            print(
                f"\n{path}: pcm x{scale:g}, {scope}; perplexity, and its difference to {ref} at the same fraction "
                f"and seed (mean ± std over {doc['seeds']} seeds; seeds won)"
            )
            head = ["selector"] + [f"ppl {f:g}" for f in fractions] + [f"vs {ref}, {f:g} digital" for f in fractions]
            print(format_table(head, table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
