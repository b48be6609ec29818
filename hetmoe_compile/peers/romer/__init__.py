"""ROMER (Zhou et al. 2026) as two optional post-training passes on a placed, canonical model under AIMC noise:
under-activated analog experts replaced by frequently used ones (:func:`replace_underused_experts`), and router
logits recalibrated by per-expert percentile maps (:func:`fit_router_calibration`,
:func:`apply_router_calibration`). Both undo exactly (:func:`restore_replaced_experts`,
:func:`remove_router_calibration`)."""

from .collect import RouterOutputs, router_outputs
from .expert_replacement import Replacement, activation_frequencies, replace_underused_experts, restore_replaced_experts
from .recalibrated_router import RecalibratedRouter
from .router_calibration import (
    DEFAULT_SEEDS,
    LayerRouterCalibration,
    PercentileMap,
    RouterCalibration,
    apply_router_calibration,
    fit_percentile_map,
    fit_router_calibration,
    remove_router_calibration,
)

__all__ = [
    "DEFAULT_SEEDS",
    "LayerRouterCalibration",
    "PercentileMap",
    "RecalibratedRouter",
    "Replacement",
    "RouterCalibration",
    "RouterOutputs",
    "activation_frequencies",
    "apply_router_calibration",
    "fit_percentile_map",
    "fit_router_calibration",
    "remove_router_calibration",
    "replace_underused_experts",
    "restore_replaced_experts",
    "router_outputs",
]
