"""The selectors' scores as a picture: one heatmap of ranks per selector (``analyze``'s ``scores.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base.figures import save_figure as _save
from .base import Scores


def plot_scores(scores: dict[str, Scores], path: Path, title: str = "", digital_fraction: float | None = None) -> Path:
    """One heatmap (layers x experts) per selector, coloured by rank within the layer (1 = most sensitive);
    with ``digital_fraction``, the experts a per-layer placement would put on digital are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    layers = sorted(next(iter(scores.values())).layers)
    n_exp = len(next(iter(scores.values())).layers[layers[0]])
    fig, axes = plt.subplots(
        len(names),
        1,
        figsize=(max(6, 0.28 * n_exp + 2), 1.0 + (0.35 + 0.3 * len(layers)) * len(names)),
        squeeze=False,
        sharex=True,
        constrained_layout=True,
    )
    for ax, name in zip(axes[:, 0], names):
        mat = np.stack([scores[name].layers[i] for i in layers])
        ranks = mat.argsort(1).argsort(1) / max(1, n_exp - 1)
        im = ax.imshow(ranks, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(layers)), [f"L{i}" for i in layers])
        ax.set_xticks(range(0, n_exp, max(1, n_exp // 16)))
        ax.tick_params(axis="x", labelbottom=ax is axes[-1, 0])
        ax.set_title(name, fontsize=9, loc="left")
        if digital_fraction:
            k = int(np.ceil(digital_fraction * n_exp - 1e-9))
            for r, row in enumerate(mat):
                for e in np.argsort(-row, kind="stable")[:k]:
                    ax.add_patch(plt.Rectangle((e - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    axes[-1, 0].set_xlabel("expert")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="rank within layer (1 = most sensitive)", shrink=0.8)
    if digital_fraction:
        axes[0, 0].set_title(f"red: top {digital_fraction:g} per layer (digital)", fontsize=8, loc="right")
    fig.suptitle(title or "expert sensitivity scores", fontsize=10)
    out = _save(fig, path)
    plt.close(fig)
    return out
