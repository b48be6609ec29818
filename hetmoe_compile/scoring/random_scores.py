"""Baseline: seeded random scores (a random placement)."""

from __future__ import annotations

import numpy as np
from torch import nn

from ..models.recognize import ModelInfo
from .base import register_selector


@register_selector("random", False, "seeded uniform random scores (baseline)")
def score_random(model: nn.Module, info: ModelInfo, calibration=None, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer.index: rng.random(layer.num_experts) for layer in info.moe_layers}
