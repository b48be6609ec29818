"""Low-bit digital experts on the reference model: perplexity with the digital experts in float32, INT8 and INT4
(group 128), 25 % of experts digital by max-neuron-norm, analog experts ideal or under PCM noise; and the
quantisation error per expert (worst-case bound from the steps vs measured).

    python benchmarks/lowbit_ppl.py [--model DIR] [--text FILE] [--tokens N] [--seeds N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import hetmoe_compile as hc
from hetmoe_compile.eval.perplexity import perplexity
from hetmoe_compile.transforms.lowbit import quantize_digital_experts

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "olmoe-ref"))
    ap.add_argument("--text", default=str(SHARED / "data" / "wikitext2-raw-test.txt"))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--noise-scale", type=float, default=2.5)
    args = ap.parse_args()
    tokenizer = hc.load_tokenizer(args.model)
    text = Path(args.text).read_text()
    table, errors = [], {}
    for bits in (None, 8, 4):
        model = hc.load_model(args.model)
        compiled = hc.compile(model, hc.PlacementPolicy(0.25), hc.analog_config("pcm", noise_scale=args.noise_scale))
        if bits:
            errors[bits] = quantize_digital_experts(model, bits, 128)
        ideal = perplexity(model, tokenizer, text, max_tokens=args.tokens).ppl
        noisy = []
        for seed in range(args.seeds):
            compiled.simulate(seed)
            noisy.append(perplexity(model, tokenizer, text, max_tokens=args.tokens).ppl)
        compiled.restore()
        table.append([f"INT{bits}" if bits else "float32", ideal, float(np.mean(noisy)), float(np.std(noisy))])
    print(
        f"{args.model}: 25 % digital, {args.tokens} tokens of {Path(args.text).name}, PCM x{args.noise_scale:g} "
        f"over {args.seeds} instances"
    )
    print("| digital experts | ppl, analog ideal | ppl, analog PCM (mean ± std) |\n|---|---:|---:|")
    for name, ideal, mean, std in table:
        print(f"| {name} | {ideal:.2f} | {mean:.2f} ± {std:.2f} |")
    print(
        "\n| bits | experts | gate/up bound (mean) | gate/up measured | down bound | down measured | "
        "expert output, measured (mean / max) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for bits, rows in errors.items():
        m = {
            k: np.mean([getattr(r, k) for r in rows])
            for k in ("gate_up_bound", "gate_up_error", "down_bound", "down_error", "output_error")
        }
        worst = max(r.output_error for r in rows)
        print(
            f"| INT{bits} | {len(rows)} | {m['gate_up_bound']:.2e} | {m['gate_up_error']:.2e} "
            f"| {m['down_bound']:.2e} | {m['down_error']:.2e} | {m['output_error']:.2e} / {worst:.2e} |"
        )


if __name__ == "__main__":
    main()
