"""The ahead-of-time pipeline steps, composed: recognise -> score -> place (by rank or under a budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from torch import nn

from ..models.calibration import Calibration
from ..models.recognize import ModelInfo, recognize
from ..placement.placement import Placement, place
from ..placement.policy import PlacementPolicy
from ..scoring import Scores, score, score_all


@dataclass
class Analysis:
    """Scores of every selector run, with per-layer Spearman correlations against a reference selector;
    :meth:`to_dict` is ``scores.json`` (what ``hetmoe-compile analyze`` writes), :meth:`save` writes it and
    :meth:`plot` the heatmap ``scores.png``."""

    info: ModelInfo
    scores: dict[str, Scores]
    reference: str | None
    model: dict = field(default_factory=dict)
    """The model's identity (:func:`~hetmoe_compile.models.identity.model_identity`)."""
    calibration: dict | None = None
    """``{"source", "tokens", "forward_seconds"}`` of the calibration text the data-driven selectors read."""
    seed: int = 0

    def to_dict(self) -> dict:
        """The ``scores.json`` document: each selector's time, calibration tokens and summary, and per layer each
        expert's scores and each selector's Spearman correlation with the reference (``null`` where undefined)."""
        from ..base.version import PRODUCER
        from ..placement.schema import SCHEMA_VERSION
        from ..scoring import selectors

        rho = self.spearman()
        tokens = self.calibration["tokens"] if self.calibration else 0
        return {
            "schema_version": SCHEMA_VERSION,
            "producer": PRODUCER,
            "model": self.model,
            "selectors": {
                n: {
                    "seconds": s.seconds,
                    "calibration_tokens": tokens if selectors()[n].needs_calibration else 0,
                    "summary": selectors()[n].summary,
                }
                for n, s in self.scores.items()
            },
            "calibration": self.calibration,
            "seed": self.seed,
            "reference": self.reference,
            "layers": [
                {
                    "index": l.index,
                    "module": l.experts,
                    "spearman_vs_reference": {n: r[l.index] for n, r in rho.items()},
                    "experts": [
                        {"id": e, "scores": {n: s.of(l.index, e) for n, s in self.scores.items()}}
                        for e in range(l.num_experts)
                    ],
                }
                for l in self.info.moe_layers
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` (``scores.json``) atomically; returns the path."""
        from ..base.io import atomic_write_text, strict_json

        return atomic_write_text(Path(path), strict_json(self.to_dict()) + "\n")

    def plot(self, path: str | Path, digital_fraction: float = 0.25, title: str = "") -> Path:
        """The heatmap of every selector's ranks (``scores.png``), the top ``digital_fraction`` outlined."""
        from ..scoring.heatmap import plot_scores

        title = title or f"{self.info.architecture}: expert sensitivity ({self.model.get('source', '')})"
        return plot_scores(self.scores, Path(path), title, digital_fraction)

    def spearman(self) -> dict[str, dict[int, float]]:
        """``{selector: {layer: rho}}`` against the reference selector (``measured`` when it was run)."""
        if self.reference is None:
            return {}
        ref = self.scores[self.reference]
        out: dict[str, dict[int, float]] = {}
        for name, s in self.scores.items():
            if name == self.reference:
                continue
            out[name] = {}
            for layer in self.info.moe_layers:
                a, b = ref.layers[layer.index], s.layers[layer.index]
                rho = spearmanr(a, b)[0] if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")
                out[name][layer.index] = float(rho)
        return out

    def table(self, digital_fraction: float = 0.25) -> str:
        """Per layer, the experts a ``digital_fraction`` placement makes digital by the first selector, and each
        selector's Spearman correlation with the reference."""
        from ..base.tables import format_table

        rho = self.spearman()
        first = next(iter(self.scores))
        k = max(1, math.ceil(digital_fraction * self.info.moe_layers[0].num_experts - 1e-9))
        rows = []
        for layer in self.info.moe_layers:
            s = self.scores[first].layers[layer.index]
            top = sorted(range(layer.num_experts), key=lambda e: (-s[e], e))[:k]
            rows.append([layer.index, " ".join(map(str, top))] + [f"{rho[n][layer.index]:+.2f}" for n in rho])
        text = format_table(["layer", f"top {k} by {first}"] + [f"rho({n})" for n in rho], rows)
        if rho:
            text += f"\n(rho: Spearman rank correlation with '{self.reference}' per layer)"
        return text


def analyze_model(
    model: nn.Module,
    selectors: list[str],
    calibration: Calibration | None = None,
    seed: int = 0,
    info: ModelInfo | None = None,
) -> Analysis:
    """Run ``selectors`` on ``model``; the Spearman reference is ``measured`` if run, else the first selector."""
    info = info or recognize(model)
    scores = score_all(model, info, selectors, calibration, seed)
    reference = "measured" if "measured" in scores else (selectors[0] if selectors else None)
    return Analysis(info, scores, reference)


def analyze_checkpoint(source: str, selectors: list[str], seed: int = 0, dtype="auto") -> tuple[nn.Module, Analysis]:
    """``(meta model, analysis)`` of a local checkpoint without loading it: the model is built on the meta device
    and the data-free ``selectors`` read the weights from the safetensors files one expert at a time (see
    :mod:`hetmoe_compile.scoring.checkpoint_scores`); the scores equal those of the loaded model."""
    from ..models.loader import load_meta_model
    from ..scoring.checkpoint_scores import score_checkpoint

    model, parameters = load_meta_model(source, dtype)
    info = recognize(model)
    scores = score_checkpoint(model, info, parameters, selectors, seed, next(model.parameters()).dtype)
    return model, Analysis(info, scores, "measured" if "measured" in scores else (selectors[0] if selectors else None))


def routing_frequencies(
    model: nn.Module, info: ModelInfo, calibration: Calibration | None
) -> dict[int, list[float]] | None:
    """Each expert's measured share of the calibration tokens, for the cost model (None: uniform routing)."""
    if calibration is None:
        return None
    from ..scoring.routing_stats import routing_stats

    return {i: s["frequency"].tolist() for i, s in routing_stats(model, info, calibration).items()}


def place_scores(
    model: nn.Module,
    info: ModelInfo,
    scores: Scores,
    policy: PlacementPolicy,
    source: str = "",
    cost_params=None,
    frequencies: dict[int, list[float]] | None = None,
) -> Placement:
    """Place by ``scores``: the top ``digital_fraction`` ranked, or, for a policy with a budget, under the budget
    (:func:`hetmoe_compile.cost.budget.place_under_budget`, costed with ``cost_params`` and routing
    ``frequencies``)."""
    if policy.budget is not None:
        from ..cost.budget import place_under_budget

        return place_under_budget(model, info, scores, policy, cost_params, source=source, frequencies=frequencies)
    return place(model, info, scores, policy, source)


def place_model(
    model: nn.Module,
    policy: PlacementPolicy,
    calibration: Calibration | None = None,
    source: str = "",
    info: ModelInfo | None = None,
    cost_params=None,
) -> Placement:
    """Score with ``policy.selector`` and place (a budget is costed with the calibration text's routing)."""
    info = info or recognize(model)
    scores = score(model, info, policy.selector, calibration, policy.seed)
    frequencies = routing_frequencies(model, info, calibration) if policy.budget is not None else None
    return place_scores(model, info, scores, policy, source, cost_params, frequencies)
