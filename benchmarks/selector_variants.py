"""Sweeps for the placement evidence of issue 18: the expected-damage selector beside max-neuron-norm, activation
frequency, activation weight and the measured oracle, plus the two expected-damage variants that stay out of the
product (registered here only): ``S * frequency`` and ``S * sqrt(sum_t w_t^2)`` (S: max neuron norm; the product's
form is ``S * sum_t w_t``). Runs
``hetmoe-compile sweep`` with these selectors (unless ``--selectors`` is given), the arguments after ``--`` passed
through; paired
differences then come from ``benchmarks/paired_differences.py``.

    python benchmarks/selector_variants.py -- ../shared/models/olmoe-ref --fractions 0.125,0.25 ... --out DIR
"""

from __future__ import annotations

import sys

import numpy as np
import torch

VARIANTS = ("damage-frequency", "damage-energy")
SELECTORS = (
    "max-neuron-norm",
    "activation-frequency",
    "activation-weight",
    "expected-damage",
    *VARIANTS,
    "measured",
    "random",
)


def register_variants() -> None:
    from hetmoe_compile.scoring.base import register_selector
    from hetmoe_compile.scoring.max_neuron_norm import score_max_neuron_norm

    def traffic(model, info, calibration, kind: str) -> dict[int, np.ndarray]:
        out = {}
        for index, cap in calibration.routing(model, info).items():
            e = info.layer(index).num_experts
            flat = cap.top_k_index.reshape(-1)
            w = cap.top_k_weights.reshape(-1).double()
            w = torch.ones_like(w) if kind == "tokens" else w * w
            total = torch.zeros(e, dtype=torch.float64).index_add_(0, flat, w).numpy()
            out[index] = total if kind == "tokens" else np.sqrt(total)
        return out

    def variant(kind: str):
        def fn(model, info, calibration, seed=0):
            s = score_max_neuron_norm(model, info)
            t = traffic(model, info, calibration, kind)
            return {i: s[i] * t[i] for i in s}

        return fn

    register_selector("damage-frequency", True, "max-neuron-norm x routed tokens (variant)")(variant("tokens"))
    register_selector("damage-energy", True, "max-neuron-norm x sqrt(sum of squared routing weights) (variant)")(
        variant("energy")
    )


def main(argv: list[str]) -> int:
    from hetmoe_compile.cli.app import main as cli

    if "--" not in argv:
        print(__doc__)
        return 2
    register_variants()
    rest = argv[argv.index("--") + 1 :]
    if "--selectors" not in rest:
        rest += ["--selectors", ",".join(SELECTORS)]
    return cli(["sweep", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
