"""Data-free peer: the L2 norm of the expert's row in the router weight ``[E, H]``."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models.recognize import ModelInfo
from .base import register_selector


@register_selector("router-norm", False, "L2 norm of the expert's router row (data-free)")
def score_router_norm(model: nn.Module, info: ModelInfo, calibration=None, seed: int = 0) -> dict[int, np.ndarray]:
    out = {}
    with torch.no_grad():
        for layer in info.moe_layers:
            weight = model.get_submodule(layer.router).weight
            out[layer.index] = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64).cpu().numpy()
    return out
