"""25 % max-neuron-norm against random under each device preset and time since programming, from the sweeps'
results.json files (``make devices``).

Seed s programs the same devices for an expert in both placements and drifts them to every time (common random
numbers), so the per-seed differences isolate the choice of digital experts. Prints one table per file: at each
time, both placements' mean perplexity, the mean difference (max-neuron-norm - random; negative = better) with its
std over seeds and how many seeds max-neuron-norm won, and the every-expert-analog and all-digital rows where the
sweep has them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(paths: list[str]) -> int:
    from hetmoe_compile.base.tables import format_table
    from hetmoe_compile.eval.under_noise import split_time_key

    for path in paths:
        doc = json.loads(Path(path).read_text())
        rows = [r for r in doc["rows"] if r["dense"] == "digital"]
        analog = doc["analog"]
        keys = [k for k in rows[0]["metrics"] if (p := split_time_key(k)) is not None and p[1] == "ppl"]
        by = {(r["selector"], r["digital_fraction"]): r["metrics"] for r in rows}
        table = []
        for key in keys:
            label = split_time_key(key)[0]  # type: ignore[index]
            mnn = np.array(by[("max-neuron-norm", 0.25)][key]["values"])
            rnd = np.array(by[("random", 0.25)][key]["values"])
            d = mnn - rnd
            baselines = [f"{by[b][key]['mean']:.2f}" if key in by.get(b, {}) else "-" for b in (("-", 0.0), ("-", 1.0))]
            table.append(
                [
                    label,
                    *baselines,
                    f"{mnn.mean():.2f}",
                    f"{rnd.mean():.2f}",
                    f"{d.mean():+.2f} ± {d.std():.2f}",
                    f"{int((d < 0).sum())}/{len(d)}",
                ]
            )
        print(f"\n{path}: {analog['preset']} x{analog['noise_scale']:g}, {doc['seeds']} hardware instances")
        head = ["t", "experts all analog", "all digital", "25% max-neuron-norm", "25% random", "difference"]
        head.append("seeds won")
        print(format_table(head, table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
