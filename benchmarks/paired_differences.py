"""Paired comparison of selectors from a sweep's results.json.

Seed s programs the same devices for an expert in every placement (common random numbers), so per-seed
differences between two placements at the same fraction isolate the choice of digital experts. Prints, per
fraction, each selector's mean perplexity difference to `random` (negative = better) with its std over seeds,
and how many seeds it won.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(paths: list[str]) -> int:
    from hetmoe_compile.tables import format_table

    for path in paths:
        doc = json.loads(Path(path).read_text())
        rows = [r for r in doc["rows"] if r["dense"] == "digital" and r["selector"] != "-"]
        fractions = sorted({r["digital_fraction"] for r in rows})
        selectors = list(dict.fromkeys(r["selector"] for r in rows))
        by = {(r["selector"], r["digital_fraction"]): np.array(r["metrics"]["ppl"]["values"]) for r in rows}
        table = []
        for sel in selectors:
            cells = [sel]
            for f in fractions:
                d = by[(sel, f)] - by[("random", f)]
                cells.append(f"{d.mean():+.2f} ± {d.std():.2f} ({int((d < 0).sum())}/{len(d)})")
            table.append(cells)
        scale = doc["analog"]["noise_scale"]
        print(
            f"\n{path}: pcm x{scale:g}, perplexity difference to random at the same fraction and seed "
            f"(mean ± std over {doc['seeds']} seeds; seeds won)"
        )
        print(format_table(["selector"] + [f"{f:g} digital" for f in fractions], table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
