"""All-analog and dense-digital perplexity against programming-noise scale on the reference model, for each device
preset and time since programming: to choose the sweeps' noise levels (one strong enough that all-analog loses
clearly) and to see how each device ages. Prints one table per preset; writes a plot with --plot, and its numbers
beside it (.json).

Every time of a preset is evaluated on the same devices (the same programming and drift draws, drifted further);
a time a device has no fit at (``reram-wan2022``: 1 s, 1 day and 2 days only) is left out, with a note."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF = REPO.parent / "shared" / "models" / "olmoe-ref"
TEXT = REPO.parent / "shared" / "data" / "wikitext2-raw-test.txt"
MODES = ("experts analog, dense digital", "all analog")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(REF))
    ap.add_argument("--ppl", default=str(TEXT))
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--scales", default="0,0.5,1,1.5,2.5,4")
    ap.add_argument("--presets", default="pcm", help="comma-separated noise presets (device presets included)")
    ap.add_argument("--times", default="3600", help="comma-separated times since programming, in seconds")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    from tqdm import tqdm

    from hetmoe_compile.analog import analog_config
    from hetmoe_compile.analog.device_models import WAN2022_TIMES
    from hetmoe_compile.base.tables import format_table
    from hetmoe_compile.eval.under_noise import EvalSpec, evaluate_under_noise, read_inputs, time_key, time_label
    from hetmoe_compile.models import load_model, load_tokenizer, recognize
    from hetmoe_compile.transforms.canonicalize import canonicalize

    model = load_model(args.model)
    info = recognize(model)
    tok = load_tokenizer(args.model)
    scales = [float(s) for s in args.scales.split(",")]
    presets = args.presets.split(",")
    times = [float(t) for t in args.times.split(",")]
    for p in presets:  # bad names fail here, before any evaluation
        analog_config(p)
    clean_spec = EvalSpec(ppl_path=args.ppl, ppl_tokens=args.ppl_tokens, seeds=1)
    prepared = read_inputs(clean_spec)
    all_analog = {l.index: {e: "analog" for e in range(l.num_experts)} for l in info.moe_layers}
    canonicalize(model, None, info)
    clean = evaluate_under_noise(model, info, tok, analog_config("ideal"), clean_spec, prepared, "digital", False)
    clean_ppl = clean["ppl"]["mean"]
    canonicalize(model, all_analog, info)

    def fitted(preset: str) -> list[float]:
        device = analog_config(preset).device
        return [t for t in times if device != "reram-wan2022" or t in WAN2022_TIMES]

    # curves[preset][mode][time] = (mean, std) per scale
    curves: dict[str, dict[str, dict[float, list[tuple[float, float]]]]] = {}
    bar = tqdm(total=len(presets) * len(scales) * len(MODES), desc="noise scan", unit="eval")
    for preset in presets:
        spec = EvalSpec(ppl_path=args.ppl, ppl_tokens=args.ppl_tokens, seeds=args.seeds, times=fitted(preset))
        curves[preset] = {m: {t: [] for t in spec.times or []} for m in MODES}
        for c in scales:
            cfg = analog_config(preset, noise_scale=c)
            for mode, dense in zip(MODES, ("digital", "analog")):
                out = evaluate_under_noise(model, info, tok, cfg, spec, prepared, dense)
                for t in spec.times or []:
                    stats = out[time_key(t, "ppl")]
                    curves[preset][mode][t].append((stats["mean"], stats["std"]))
                bar.update()
    bar.close()
    print(f"all-digital perplexity: {clean_ppl:.2f} ({args.ppl_tokens} tokens of {Path(args.ppl).name})")
    print(f"{args.seeds} hardware instances per cell (mean ± std); every time of a preset on the same devices\n")
    for preset in presets:
        ts = fitted(preset)
        header = ["noise scale"] + [f"{mode.split(',')[0]}, t={time_label(t)}" for mode in MODES for t in ts]
        rows = [
            [f"{c:g}"] + [f"{m:.2f} ± {s:.2f}" for mode in MODES for t in ts for m, s in [curves[preset][mode][t][i]]]
            for i, c in enumerate(scales)
        ]
        missing = [time_label(t) for t in times if t not in ts]
        note = f" (no fit at {', '.join(missing)})" if missing else ""
        print(f"preset {preset}{note}")
        print(format_table(header, rows))
        print()
    if args.plot:
        _plot(args.plot, curves, scales, times, clean_ppl, time_label)
        data = {"clean_ppl": clean_ppl, "scales": scales, "seeds": args.seeds, "curves": curves}
        Path(args.plot).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


def _plot(path: str, curves: dict, scales: list[float], times: list[float], clean: float, time_label) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(curves)
    fig, axes = plt.subplots(1, len(presets), figsize=(4.4 * len(presets), 3.6), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for mode, style in zip(MODES, ("-", "--")):
            for t, points in curves[preset][mode].items():
                ax.plot(
                    scales,
                    [m for m, _ in points],
                    style,
                    marker="o",
                    color=f"C{times.index(t)}",  # one colour per time in every panel
                    label=f"t={time_label(t)}" if mode == MODES[0] else None,
                )
        ax.axhline(clean, color="k", ls=":")
        ax.set_title(f"{preset} (solid: experts analog; dashed: all analog)", fontsize=8)
        ax.set_xlabel("programming-noise scale c")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("perplexity (WikiText-2 test)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
