"""Cost-model figures for the paper's four placements: all-digital, all-analog (dense modules on AIMC too),
dense-digital (every routed expert on AIMC) and dense-digital + 25 % of experts digital by max-neuron-norm.

Models: the reference model as stored (float32) and in bfloat16, and an OLMoE-1B-7B-shaped model (16 layers,
64 experts, top-8, bfloat16) built on the meta device (shapes only, no weights, so its placement uses `random`
scores: with uniform routing every expert costs the same, so the choice does not change the figures). Decode at
batch 1 and 16, context 2048, default parameters (`hetmoe_compile.cost.params`), uniform routing.

    python benchmarks/cost_table.py [--model DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hetmoe_compile.base.tables import format_table
from hetmoe_compile.cost import CostParams, estimate_cost, format_bytes, format_si
from hetmoe_compile.models import load_model, recognize
from hetmoe_compile.placement.placement import place
from hetmoe_compile.placement.policy import PlacementPolicy
from hetmoe_compile.scoring import score

SHARED = Path(__file__).resolve().parents[2] / "shared"
PLACEMENTS = [
    ("all-digital", 1.0, "digital"),
    ("all-analog", 0.0, "analog"),
    ("dense-digital", 0.0, "digital"),
    ("25 % max-neuron-norm", 0.25, "digital"),
]


def olmoe_1b_7b() -> torch.nn.Module:
    from shapes import olmoe_1b_7b_config
    from transformers import OlmoeForCausalLM

    cfg = olmoe_1b_7b_config(16, torch_dtype="bfloat16")
    with torch.device("meta"):
        return OlmoeForCausalLM(cfg).to(torch.bfloat16).eval()


def table(name: str, model: torch.nn.Module, selector: str) -> None:
    info = recognize(model)
    scores = score(model, info, selector)
    for batch in (1, 16):
        params = CostParams(batch_size=batch)
        rows = []
        for label, fraction, dense in PLACEMENTS:
            placement = place(model, info, scores, PlacementPolicy(fraction, scores.selector, dense=dense))
            c = estimate_cost(model, placement, params, info=info).to_dict()
            e = c["energy_breakdown_j"]
            rows.append(
                [
                    label,
                    format_si(c["energy_per_token_j"], "J", 3),
                    format_si(e["digital_compute"], "J", 3),
                    format_si(e["digital_memory"], "J", 3),
                    format_si(e["analog_mvm"], "J", 3),
                    format_si(e["link"], "J", 3),
                    f"{c['tokens_per_s']:,.0f}",
                    format_bytes(c["digital_memory_bytes"]),
                ]
            )
        print(f"\n{name}, decode batch {batch}, context 2048, uniform routing")
        print(
            format_table(
                [
                    "placement",
                    "energy/token",
                    "digital compute",
                    "digital memory",
                    "analog MVM",
                    "link",
                    "tokens/s",
                    "digital memory footprint",
                ],
                rows,
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "olmoe-ref"))
    args = ap.parse_args()
    ref = load_model(args.model)
    table(f"{Path(args.model).name} (float32)", ref, "max-neuron-norm")
    table(f"{Path(args.model).name} (bfloat16)", ref.to(torch.bfloat16), "max-neuron-norm")
    table("OLMoE-1B-7B shape (bfloat16, meta device)", olmoe_1b_7b(), "random")


if __name__ == "__main__":
    main()
