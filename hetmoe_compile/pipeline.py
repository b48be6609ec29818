"""The ahead-of-time pipeline steps, composed: load -> recognise -> score -> place -> canonicalise -> capture -> tag."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr
from torch import nn
from torch.export import ExportedProgram

from .calibration import Calibration
from .canonicalize import canonicalize
from .capture import ROOT_PREFIX, export_model
from .models.recognize import ModelInfo, recognize
from .passes.annotate_placement_pass import AnnotatePlacementPass
from .placement.placement import Placement, place
from .placement.policy import PlacementPolicy
from .scoring import Scores, score, score_all


@dataclass
class Analysis:
    """Scores of every selector run, with per-layer Spearman correlations against a reference selector."""

    info: ModelInfo
    scores: dict[str, Scores]
    reference: str | None

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
        from .report import format_table

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


def analyze_model(model: nn.Module, selectors: list[str], calibration: Calibration | None = None, seed: int = 0,
                  info: ModelInfo | None = None) -> Analysis:
    """Run ``selectors`` on ``model``; the Spearman reference is ``measured`` if run, else the first selector."""
    info = info or recognize(model)
    scores = score_all(model, info, selectors, calibration, seed)
    reference = "measured" if "measured" in scores else (selectors[0] if selectors else None)
    return Analysis(info, scores, reference)


def analyze_checkpoint(source: str, selectors: list[str], seed: int = 0,
                       dtype="auto") -> tuple[nn.Module, Analysis]:
    """``(meta model, analysis)`` of a local checkpoint without loading it: the model is built on the meta device
    and the data-free ``selectors`` read the weights from the safetensors files one expert at a time (see
    :mod:`hetmoe_compile.scoring.checkpoint_scores`); the scores equal those of the loaded model."""
    from .models.loader import load_meta_model
    from .scoring.checkpoint_scores import score_checkpoint

    model, parameters = load_meta_model(source, dtype)
    info = recognize(model)
    scores = score_checkpoint(model, info, parameters, selectors, seed, next(model.parameters()).dtype)
    return model, Analysis(info, scores, "measured" if "measured" in scores else (selectors[0] if selectors else None))


def place_model(model: nn.Module, policy: PlacementPolicy, calibration: Calibration | None = None,
                source: str = "", info: ModelInfo | None = None) -> Placement:
    """Score with ``policy.selector`` and place."""
    info = info or recognize(model)
    scores = score(model, info, policy.selector, calibration, policy.seed)
    return place(model, info, scores, policy, source)


def tag_graph(model: nn.Module, placement: Placement, info: ModelInfo | None = None) -> ExportedProgram:
    """Canonicalise ``model`` in place to ``placement``, ``torch.export`` it and tag every node's placement."""
    info = info or recognize(model)
    canonicalize(model, placement.devices(), info)
    info = recognize(model)  # module kinds of the canonical model
    ep = export_model(model)
    sig = ep.graph_signature
    fqns = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    annotate = AnnotatePlacementPass(placement, info, fqns, ROOT_PREFIX)
    result = annotate(ep.graph_module)
    assert result is not None
    return ep
