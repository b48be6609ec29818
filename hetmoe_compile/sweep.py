"""Sweep digital fraction x selector under one noise setting, with all-digital / all-analog references and the
dense-on-analog ablation; results as JSON, a Markdown table and plots."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from .analog.config import AnalogConfig
from .calibration import Calibration
from .canonicalize import canonicalize
from .evaluation import EvalSpec, Prepared, evaluate_under_noise, prepare
from .models.recognize import ModelInfo
from .placement.placement import place
from .placement.policy import PlacementPolicy
from .scoring import score


@dataclass
class SweepRow:
    label: str
    selector: str
    digital_fraction: float
    dense: str
    metrics: dict


def run_sweep(model: nn.Module, info: ModelInfo, tokenizer, fractions: list[float], selectors: list[str],
              cfg: AnalogConfig, spec: EvalSpec, calibration: Calibration | None = None, ablation: bool = True,
              prepared: Prepared | None = None) -> list[SweepRow]:
    """Evaluate every (selector, fraction) placement with dense modules digital, plus references and ablation.

    Fractions 0 and 1 do not depend on the selector and are evaluated once. All placements share hardware
    instances (seed s programs the same devices for an expert in every placement).
    """
    if not selectors:
        raise ValueError("run_sweep needs at least one selector")
    prepared = prepared or prepare(spec)
    scores = {s: score(model, info, s, calibration) for s in selectors}
    jobs: list[tuple[str, str, float, str]] = [("all-digital", "-", 1.0, "digital"), ("all-analog", "-", 0.0, "analog"),
                                               ("dense-digital", "-", 0.0, "digital")]
    inner = [f for f in fractions if 0.0 < f < 1.0]
    jobs += [(f"{s} {f:g}", s, f, "digital") for s in selectors for f in inner]
    if ablation and selectors:
        jobs += [(f"{selectors[0]} {f:g} (dense analog)", selectors[0], f, "analog") for f in inner]
    rows = []
    for label, selector, fraction, dense in tqdm(jobs, desc="sweep", unit="placement"):
        sel_scores = scores.get(selector, scores[selectors[0]])  # fractions 0 and 1 do not depend on scores
        placement = place(model, info, sel_scores, PlacementPolicy(fraction, sel_scores.selector, dense=dense))
        canonicalize(model, placement.devices(), info)
        has_analog = any(l.ids("analog") for l in placement.layers)
        metrics = evaluate_under_noise(model, info, tokenizer, cfg, spec, prepared, dense, has_analog)
        rows.append(SweepRow(label, selector, fraction, dense, metrics))
    canonicalize(model, None, info)  # leave the model all-digital
    return rows


def _fmt(m: dict) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f}" if m["std"] > 0 else f"{m['mean']:.3f}"


def results_markdown(rows: list[SweepRow], cfg: AnalogConfig, seeds: int) -> str:
    metrics = list(rows[0].metrics)
    head = (f"Noise preset `{cfg.preset}` (noise scale {cfg.noise_scale:g}, t_inference {cfg.t_inference:g} s), "
            f"mean ± std over {seeds} hardware instances.\n\n")
    lines = ["| placement | selector | digital fraction | dense | " + " | ".join(metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for r in rows:
        lines.append(f"| {r.label} | {r.selector} | {r.digital_fraction:g} | {r.dense} | "
                     + " | ".join(_fmt(r.metrics[m]) for m in metrics) + " |")
    return head + "\n".join(lines) + "\n"


def plot_sweep(rows: list[SweepRow], metric: str, path: Path, title: str) -> Path:
    """Metric against digital fraction: one line per selector (dense digital), references as horizontal lines and
    the dense-on-analog ablation dashed (left); the dense-digital placements alone, zoomed (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _save

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    by = {r.label: r for r in rows}
    ends = [by["dense-digital"], by["all-digital"]]
    selectors = list(dict.fromkeys(r.selector for r in rows if r.selector != "-"))
    for zoom, ax in enumerate(axes):
        for i, sel in enumerate(selectors):
            pts = sorted([r for r in rows if r.selector == sel and r.dense == "digital"],
                         key=lambda r: r.digital_fraction)
            pts = [ends[0]] + pts + [ends[1]]
            ax.errorbar([r.digital_fraction for r in pts], [r.metrics[metric]["mean"] for r in pts],
                        yerr=[r.metrics[metric]["std"] for r in pts], marker="o", ms=4, capsize=2, label=sel,
                        color=f"C{i}")
            abl = sorted([r for r in rows if r.selector == sel and r.dense == "analog"],
                         key=lambda r: r.digital_fraction)
            if abl and not zoom:
                ax.plot([r.digital_fraction for r in abl], [r.metrics[metric]["mean"] for r in abl], ls="--",
                        marker="x", color=f"C{i}", label=f"{sel}, dense on analog")
        ax.axhline(by["all-digital"].metrics[metric]["mean"], color="k", ls=":", label="all-digital")
        if not zoom:
            ax.axhline(by["all-analog"].metrics[metric]["mean"], color="grey", ls="-.", label="all-analog")
        ax.set_xlabel("digital fraction of routed experts (per layer)")
        ax.set_ylabel(metric)
        ax.set_title(title if not zoom else "dense modules digital (zoom)", fontsize=9)
    values = [r.metrics[metric]["mean"] for r in rows]
    if metric == "ppl" and min(values) > 0 and max(values) / min(values) > 5:
        axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_sweep(out_dir: Path, rows: list[SweepRow], cfg: AnalogConfig, spec: EvalSpec, meta: dict) -> list[Path]:
    """``results.json``, ``results.md`` and one PNG per metric, written atomically into ``out_dir``."""
    from .io import atomic_output_dir

    with atomic_output_dir(out_dir) as tmp:
        doc = {**meta, "analog": cfg.to_dict(), "seeds": spec.seeds, "rows": [asdict(r) for r in rows]}
        (tmp / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "results.md").write_text(results_markdown(rows, cfg, spec.seeds))
        names = ["results.json", "results.md"]
        for metric in rows[0].metrics:
            name = f"{metric.replace('/', '_')}.png"
            plot_sweep(rows, metric, tmp / name, f"{meta.get('model', {}).get('source', '')}: {metric} under "
                       f"{cfg.preset} x{cfg.noise_scale:g}")
            names.append(name)
    return [out_dir / n for n in names]
