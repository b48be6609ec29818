"""ROMER router logit recalibration: per-expert percentile maps from noisy onto clean router logits.

Routers stay digital, but analog noise in upstream experts shifts their inputs, so the logit distributions drift
and routing degrades. On the calibration tokens, each MoE layer's router logits are collected clean (every analog
group ideal) and under noise (hardware instances ``seeds``, pooled); per expert ``e`` the percentiles
``lo, hi`` of both give the affine map ``a_e * x + b_e`` taking the noisy ``lo``/``hi`` percentiles onto the clean
ones. :func:`apply_router_calibration` puts it in front of each router's own routing (:class:`RecalibratedRouter`).

The default calibration seed (1000) is disjoint from the evaluation seeds ``0..N-1``: the maps are fitted on
hardware instances the evaluation never sees, so they must generalise across instances rather than fit one.
All layers are fitted from the same passes (uncalibrated routers upstream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...analog.config import AnalogConfig
from ...base.errors import HetMoEError
from ...models.calibration import Calibration
from ...models.recognize import ModelInfo
from .collect import check_canonical, check_inputs, router_outputs
from .recalibrated_router import RecalibratedRouter

DEFAULT_SEEDS = (1000,)
"""Calibration hardware instances: disjoint from the evaluation seeds 0..N-1."""
DEGENERATE_SPREAD = 1e-12


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` with ``0 <= lo < hi <= 100``, else :class:`HetMoEError`."""
    try:
        lo, hi = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise HetMoEError(f"percentiles must be two numbers (lo, hi), got {percentiles!r}; e.g. (5, 95)") from None
    if not 0.0 <= lo < hi <= 100.0:
        raise HetMoEError(f"percentiles must satisfy 0 <= lo < hi <= 100, got ({lo:g}, {hi:g}); e.g. (5, 95)")
    return lo, hi


@dataclass
class PercentileMap:
    """Per-expert affine map ``scale * x + shift`` taking the noisy percentiles onto the clean ones."""

    scale: np.ndarray
    shift: np.ndarray
    clean_lo: np.ndarray
    clean_hi: np.ndarray
    noisy_lo: np.ndarray
    noisy_hi: np.ndarray


def fit_percentile_map(
    clean: torch.Tensor | np.ndarray, noisy: torch.Tensor | np.ndarray, percentiles: Sequence[float] = (5.0, 95.0)
) -> PercentileMap:
    """Fit the map on logits ``clean [N, E]`` and ``noisy [M, E]`` (linear-interpolated percentiles, float64).

    ``a = (c_hi - c_lo) / (n_hi - n_lo)``, ``b = c_lo - a * n_lo``. Where the noisy spread is degenerate
    (``n_hi - n_lo <= 1e-12 * max(1, |n_lo|, |n_hi|)``) the scale cannot be estimated: ``a = 1`` and ``b`` aligns
    the midpoints of the two percentile pairs.
    """
    lo, hi = check_percentiles(percentiles)
    c = np.asarray(clean.double() if isinstance(clean, torch.Tensor) else clean, dtype=np.float64)
    n = np.asarray(noisy.double() if isinstance(noisy, torch.Tensor) else noisy, dtype=np.float64)
    if c.ndim != 2 or n.ndim != 2 or c.shape[1] != n.shape[1] or not len(c) or not len(n):
        raise ValueError(f"clean and noisy logits must be non-empty [tokens, E], got {c.shape} and {n.shape}")
    c_lo, c_hi = np.percentile(c, [lo, hi], axis=0)
    n_lo, n_hi = np.percentile(n, [lo, hi], axis=0)
    spread = n_hi - n_lo
    degenerate = spread <= DEGENERATE_SPREAD * np.maximum(1.0, np.maximum(np.abs(n_lo), np.abs(n_hi)))
    scale = np.where(degenerate, 1.0, (c_hi - c_lo) / np.where(degenerate, 1.0, spread))
    shift = np.where(degenerate, (c_lo + c_hi) / 2 - (n_lo + n_hi) / 2, c_lo - scale * n_lo)
    return PercentileMap(scale, shift, c_lo, c_hi, n_lo, n_hi)


@dataclass
class LayerRouterCalibration:
    """One MoE layer's map (``scale [E]``, ``shift [E]``) and the percentiles it was fitted on."""

    layer: int
    scale: torch.Tensor
    shift: torch.Tensor
    clean_lo: torch.Tensor
    clean_hi: torch.Tensor
    noisy_lo: torch.Tensor
    noisy_hi: torch.Tensor

    @property
    def lo_drift(self) -> float:
        """Mean over experts of ``|noisy_lo - clean_lo|``."""
        return float((self.noisy_lo - self.clean_lo).abs().mean())

    @property
    def hi_drift(self) -> float:
        """Mean over experts of ``|noisy_hi - clean_hi|``."""
        return float((self.noisy_hi - self.clean_hi).abs().mean())

    def to_dict(self) -> dict:
        out: dict = {"layer": self.layer, "lo_drift": self.lo_drift, "hi_drift": self.hi_drift}
        for name in ("scale", "shift", "clean_lo", "clean_hi", "noisy_lo", "noisy_hi"):
            out[name] = [float(x) for x in getattr(self, name)]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LayerRouterCalibration:
        names = ("scale", "shift", "clean_lo", "clean_hi", "noisy_lo", "noisy_hi")
        return cls(int(data["layer"]), *(torch.tensor(data[n], dtype=torch.float32) for n in names))


@dataclass
class RouterCalibration:
    """The per-layer router logit maps of a model, with what they were fitted on."""

    layers: dict[int, LayerRouterCalibration]
    percentiles: tuple[float, float]
    seeds: tuple[int, ...]
    preset: str = ""
    noise_scale: float = 1.0
    num_tokens: int = 0

    def summary(self) -> dict:
        """Scalars: ranges of the scales and shifts, and the mean percentile drift the maps undo."""
        scales = torch.cat([l.scale for l in self.layers.values()]) if self.layers else torch.ones(1)
        shifts = torch.cat([l.shift for l in self.layers.values()]) if self.layers else torch.zeros(1)
        n = max(len(self.layers), 1)
        return {
            "preset": self.preset,
            "noise_scale": self.noise_scale,
            "num_tokens": self.num_tokens,
            "scale_min": float(scales.min()),
            "scale_max": float(scales.max()),
            "shift_min": float(shifts.min()),
            "shift_max": float(shifts.max()),
            "mean_lo_drift": sum(l.lo_drift for l in self.layers.values()) / n,
            "mean_hi_drift": sum(l.hi_drift for l in self.layers.values()) / n,
        }

    def to_dict(self) -> dict:
        """JSON-ready: the summary scalars at the top level, then the percentiles, seeds and per-layer maps."""
        return {
            **self.summary(),
            "percentiles": list(self.percentiles),
            "seeds": list(self.seeds),
            "layers": [l.to_dict() for _, l in sorted(self.layers.items())],
        }

    @classmethod
    def from_dict(cls, data: dict) -> RouterCalibration:
        layers = [LayerRouterCalibration.from_dict(d) for d in data["layers"]]
        return cls(
            {l.layer: l for l in layers},
            tuple(data["percentiles"]),
            tuple(data["seeds"]),
            data.get("preset", ""),
            float(data.get("noise_scale", 1.0)),
            int(data.get("num_tokens", 0)),
        )


def fit_router_calibration(
    model: nn.Module,
    info: ModelInfo,
    calibration: Calibration | None,
    cfg: AnalogConfig,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    percentiles: Sequence[float] = (5.0, 95.0),
    batch_size: int = 8,
) -> RouterCalibration:
    """Fit each MoE layer's router logit map on a canonical, placed model (see the module docstring).

    Runs one clean pass and one pass per seed over ``calibration``; the model is left as it came (digital, or
    simulated as before). Deterministic for the same seeds, calibration and batch size.
    """
    lo, hi = check_percentiles(percentiles)
    check_canonical(model, info, "fit_router_calibration")
    seeds = check_inputs(calibration, seeds, batch_size, "fit_router_calibration")
    assert calibration is not None  # check_inputs raised otherwise
    if any(isinstance(model.get_submodule(l.router), RecalibratedRouter) for l in info.moe_layers):
        raise HetMoEError(
            "fit_router_calibration(): the routers are recalibrated already; call "
            "remove_router_calibration(model, info) before fitting again"
        )
    clean, noisy = router_outputs(
        model, info, calibration, cfg, seeds, batch_size, keep_logits=True, desc="ROMER router calibration"
    )
    assert clean.logits is not None and noisy.logits is not None  # keep_logits=True
    layers: dict[int, LayerRouterCalibration] = {}
    for layer in info.moe_layers:
        m = fit_percentile_map(clean.logits[layer.index], noisy.logits[layer.index], (lo, hi))
        layers[layer.index] = LayerRouterCalibration(
            layer.index,
            *(
                torch.tensor(getattr(m, n), dtype=torch.float32)
                for n in ("scale", "shift", "clean_lo", "clean_hi", "noisy_lo", "noisy_hi")
            ),
        )
    return RouterCalibration(
        layers, (lo, hi), tuple(seeds), cfg.preset, float(cfg.noise_scale), int(calibration.input_ids.numel())
    )


def apply_router_calibration(model: nn.Module, info: ModelInfo, rc: RouterCalibration) -> nn.Module:
    """Replace each MoE layer's router by a :class:`RecalibratedRouter` with ``rc``'s map (in place; applying
    again replaces the map). Returns ``model``."""
    have = {l.index: l for l in info.moe_layers}
    if set(rc.layers) != set(have):
        raise HetMoEError(
            f"router calibration covers MoE layers {sorted(rc.layers)} but the model has "
            f"{sorted(have)}; fit it on this model with fit_router_calibration()"
        )
    for index, layer in have.items():
        lrc = rc.layers[index]
        if lrc.scale.numel() != layer.num_experts:
            raise HetMoEError(
                f"router calibration of layer {index} has {lrc.scale.numel()} experts, the model "
                f"{layer.num_experts}; fit it on this model with fit_router_calibration()"
            )
        router = model.get_submodule(layer.router)
        parent, attr = layer.router.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, RecalibratedRouter(router, lrc.scale, lrc.shift))
    return model


def remove_router_calibration(model: nn.Module, info: ModelInfo) -> nn.Module:
    """Put the original routers back (in place; a no-op where none is recalibrated). Returns ``model``."""
    for layer in info.moe_layers:
        router = model.get_submodule(layer.router)
        if isinstance(router, RecalibratedRouter):
            parent, attr = layer.router.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, router.inner)
    return model
