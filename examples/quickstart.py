"""Quick start: analyze an MoE model's experts, place the most sensitive 25 % on digital hardware, and evaluate
perplexity under simulated PCM hardware against the all-digital and all-analog extremes.

    python examples/quickstart.py [--model DIR] [--text FILE] [--tokens N] [--seeds N] [--noise-scale C]

The default model is the reference OLMoE in ../shared/models/olmoe-ref when present, else the bundled demo.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import hetmoe_compile as hc
from hetmoe_compile.base.tables import format_table
from hetmoe_compile.eval.perplexity import perplexity

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent.parent / "shared" / "models" / "olmoe-ref"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE if REFERENCE.is_dir() else HERE / "olmoe-demo"))
    ap.add_argument("--text", default=str(HERE / "calibration.txt"), help="text to measure perplexity on")
    ap.add_argument("--tokens", type=int, default=2048, help="first N tokens of the text")
    ap.add_argument("--seeds", type=int, default=2, help="simulated hardware instances to average")
    ap.add_argument("--noise-scale", type=float, default=2.5, help="PCM programming-noise multiplier")
    args = ap.parse_args()

    model, tokenizer = hc.load_model(args.model), hc.load_tokenizer(args.model)
    text = Path(args.text).read_text()

    print("1. Expert sensitivity (max neuron norm) and agreement with the other data-free selectors")
    print(hc.analyze(model).table(0.25))

    def ppl() -> float:
        return perplexity(model, tokenizer, text, max_tokens=args.tokens).ppl

    analog = hc.analog_config("pcm", noise_scale=args.noise_scale)
    rows = []
    for name, fraction in (("all-digital", 1.0), ("25 % digital (max-neuron-norm)", 0.25), ("all experts analog", 0.0)):
        compiled = hc.compile(model, hc.PlacementPolicy(digital_fraction=fraction), analog, source=args.model)
        if name.startswith("25"):
            print("\n2. Placement")
            print(compiled.report())
        values = []
        for seed in range(args.seeds if fraction < 1 else 1):
            compiled.simulate(seed)
            values.append(ppl())
        compiled.restore()
        rows.append([name, f"{sum(values) / len(values):.2f}", len(values)])
    print(f"\n3. Perplexity on {Path(args.text).name} ({args.tokens} tokens), PCM noise x{args.noise_scale:g}")
    print(format_table(["placement", "perplexity", "instances"], rows))


if __name__ == "__main__":
    main()
