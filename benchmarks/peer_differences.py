"""Paired comparison of the peers from a `sweep --peers` results.json.

Seed s programs the same devices for an expert in every placement (common random numbers), so the per-seed
difference between a peer's row and the same placement without the peer isolates what the peer does. A peer
alone is compared with `dense-digital` (ROMER, HPD: all experts analog) or `all-digital` (int8/int4: every
expert digital); a peer with a selector at fraction f with that selector's row at f. Prints the mean perplexity
difference (negative = better) with its std over seeds, the seeds won, and the energy change per token.

    python benchmarks/peer_differences.py benchmarks/results/peers_pcm_x2.5/results.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _baseline(row: dict) -> str:
    if row["selector"] != "-":
        return f"{row['selector']} {row['digital_fraction']:g}"
    return "all-digital" if row["digital_fraction"] == 1.0 else "dense-digital"


def main(paths: list[str]) -> int:
    from hetmoe_compile.base.tables import format_table

    for path in paths:
        doc = json.loads(Path(path).read_text())
        by = {r["label"]: r for r in doc["rows"]}
        table = []
        for r in doc["rows"]:
            if r.get("peer", "-") == "-":
                continue
            base = by[_baseline(r)]
            a, b = np.array(r["metrics"]["ppl"]["values"]), np.array(base["metrics"]["ppl"]["values"])
            if len(a) != len(b):  # one exact run (nothing analog) against several instances
                a, b = np.full(max(len(a), len(b)), a.mean()), np.full(max(len(a), len(b)), b.mean())
            d = a - b
            energy = (
                (r["cost"]["energy_per_token_j"] / base["cost"]["energy_per_token_j"] - 1) * 100
                if r.get("cost") and base.get("cost")
                else float("nan")
            )
            table.append(
                [
                    r["label"],
                    base["label"],
                    f"{d.mean():+.2f} ± {d.std():.2f}",
                    f"{int((d < 0).sum())}/{len(d)}",
                    f"{energy:+.1f} %",
                ]
            )
        scale = doc["analog"]["noise_scale"]
        print(
            f"\n{path}: pcm x{scale:g}, perplexity difference to the same placement without the peer "
            f"(mean ± std over {doc['seeds']} seeds)"
        )
        print(format_table(["row", "compared with", "Δppl", "seeds won", "Δenergy/token"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(p) for p in sorted(Path("benchmarks/results").glob("peers_*/results.json"))]))
