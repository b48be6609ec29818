"""Plots people would rather see than read (matplotlib, PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base.figures import save_figure as _save


def plot_against_time(series: dict[str, dict[str, dict]], path: Path, title: str = "") -> Path:
    """Each metric against the time since programming (log axis), one panel per metric: ``series`` maps a line's
    label to its metrics keyed ``t=<time>/<metric>`` (:func:`~.under_noise.time_key`), each ``{"mean", "std"}``;
    the band is ± one std over hardware instances. lm-eval's standard errors are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .under_noise import TIME_UNITS, split_time_key

    sizes = dict(TIME_UNITS)

    def seconds(label: str) -> float:
        for unit, size in sorted(sizes.items(), key=lambda kv: -len(kv[0])):
            if label.endswith(unit):
                return float(label[: -len(unit)]) * size
        raise ValueError(label)

    metrics: list[str] = []
    for values in series.values():
        for key in values:
            parts = split_time_key(key)
            if parts and not parts[1].endswith("_stderr") and parts[1] not in metrics:
                metrics.append(parts[1])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for line, values in series.items():
            pts = sorted(
                (seconds(p[0]), v["mean"], v["std"])
                for k, v in values.items()
                if (p := split_time_key(k)) and p[1] == metric
            )
            t, mean, std = (np.array(c) for c in zip(*pts))
            ax.plot(t, mean, marker="o", ms=3, label=line)
            ax.fill_between(t, mean - std, mean + std, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("time since programming (s)")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    if len(series) > 1:
        axes[0, -1].legend(fontsize=6, loc="best")
    fig.suptitle(title or "metrics against time since programming", fontsize=10)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_routing(series: dict[str, dict[str, dict]], path: Path, title: str = "") -> Path:
    """The routing diagnostics per MoE layer (:mod:`~.routing_diagnostics`), one line per placement: top-k and
    top-1 agreement with the clean routing, the load's KL divergence from clean, and the relative error of the
    layer's routed-expert output; ``series`` maps a line's label to its results ``metrics`` (the first time since
    programming where there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .routing_diagnostics import layer_series

    panels = [
        ("topk_match", "top-k set as clean"),
        ("top1_match", "top-1 expert as clean"),
        ("load_kl", "load KL from clean (nats)"),
        ("moe_rel_error", "MoE output rel. error"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.3), squeeze=False)
    for ax, (name, label) in zip(axes[0], panels):
        for line, metrics in series.items():
            first = next((k for k in metrics if "routing/L" in k), "")
            prefix = first[: first.index("routing/")] if first else ""
            layers, values = layer_series(metrics, name, prefix)
            if layers:
                ax.plot(layers, values, marker="o", label=line)
        ax.set_xlabel("MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
