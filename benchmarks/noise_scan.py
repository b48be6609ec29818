"""All-analog and dense-digital perplexity against PCM noise scale on the reference model, to choose the sweep's
noise levels (one strong enough that all-analog loses clearly). Prints a table; writes a plot with --plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF = REPO.parent / "shared" / "models" / "olmoe-ref"
TEXT = REPO.parent / "shared" / "data" / "wikitext2-raw-test.txt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(REF))
    ap.add_argument("--ppl", default=str(TEXT))
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--scales", default="0,0.5,1,1.5,2.5,4")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    from hetmoe_compile.analog import analog_config
    from hetmoe_compile.canonicalize import canonicalize
    from hetmoe_compile.eval.under_noise import EvalSpec, evaluate_under_noise, prepare
    from hetmoe_compile.models import load_model, load_tokenizer, recognize
    from hetmoe_compile.tables import format_table

    model = load_model(args.model)
    info = recognize(model)
    tok = load_tokenizer(args.model)
    spec = EvalSpec(args.ppl, args.ppl_tokens, seeds=args.seeds)
    prepared = prepare(spec)
    all_analog = {l.index: {e: "analog" for e in range(l.num_experts)} for l in info.moe_layers}
    canonicalize(model, None, info)
    clean = evaluate_under_noise(model, info, tok, analog_config("ideal"), spec, prepared, "digital", False)["ppl"][
        "mean"
    ]
    canonicalize(model, all_analog, info)
    rows, curves = [], {"experts analog, dense digital": [], "all analog": []}
    scales = [float(s) for s in args.scales.split(",")]
    for c in scales:
        cfg = analog_config("pcm", noise_scale=c)
        exp = evaluate_under_noise(model, info, tok, cfg, spec, prepared, "digital")["ppl"]
        full = evaluate_under_noise(model, info, tok, cfg, spec, prepared, "analog")["ppl"]
        curves["experts analog, dense digital"].append(exp["mean"])
        curves["all analog"].append(full["mean"])
        rows.append([f"{c:g}", f"{exp['mean']:.2f} ± {exp['std']:.2f}", f"{full['mean']:.2f} ± {full['std']:.2f}"])
    print(
        f"all-digital perplexity: {clean:.2f} ({args.ppl_tokens} tokens of {Path(args.ppl).name}, {args.seeds} seeds)"
    )
    print(format_table(["PCM noise scale", "experts analog (dense digital)", "all analog"], rows))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
        for label, ys in curves.items():
            ax.plot(scales, ys, marker="o", label=label)
        ax.axhline(clean, color="k", ls=":", label="all digital")
        ax.set_xlabel("PCM programming-noise scale c")
        ax.set_ylabel("perplexity (WikiText-2 test)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
