"""Data-driven peers from routing on calibration text: activation frequency and mean routing weight."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models.calibration import Calibration
from ..models.recognize import ModelInfo
from .base import register_selector


def routing_stats(model: nn.Module, info: ModelInfo, calibration: Calibration) -> dict[int, dict[str, np.ndarray]]:
    """Per layer: ``frequency`` (share of tokens routed to each expert), ``weight`` (mean routing weight over the
    tokens routed to it; 0 for an expert that received none) and ``mass`` (the sum of those routing weights)."""
    out = {}
    for index, cap in calibration.routing(model, info).items():
        e = info.layer(index).num_experts
        tokens = cap.top_k_index.shape[0]
        flat = cap.top_k_index.reshape(-1)
        counts = torch.bincount(flat, minlength=e).double()
        weight_sum = torch.zeros(e, dtype=torch.float64).index_add_(0, flat, cap.top_k_weights.reshape(-1).double())
        out[index] = {
            "frequency": (counts / tokens).numpy(),
            "weight": torch.where(counts > 0, weight_sum / counts.clamp(min=1), 0.0).numpy(),
            "mass": weight_sum.numpy(),
        }
    return out


@register_selector("activation-frequency", True, "share of calibration tokens routed to the expert")
def score_activation_frequency(model: nn.Module, info: ModelInfo, calibration: Calibration, seed: int = 0):
    return {i: s["frequency"] for i, s in routing_stats(model, info, calibration).items()}


@register_selector("activation-weight", True, "mean routing weight over the tokens routed to the expert")
def score_activation_weight(model: nn.Module, info: ModelInfo, calibration: Calibration, seed: int = 0):
    return {i: s["weight"] for i, s in routing_stats(model, info, calibration).items()}
