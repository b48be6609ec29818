"""Data-free peer: the L2 norm of the expert's row in the router weight ``[E, H]``."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn

from ..models.device_map import onloaded
from ..models.recognize import ModelInfo
from .base import register_selector


def router_norms(weight: torch.Tensor) -> np.ndarray:
    """``[E]`` L2 norms of the rows of a router weight ``[E, H]``, in float64."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64).cpu().numpy()


@register_selector("router-norm", False, "L2 norm of the expert's router row (data-free)")
def score_router_norm(model: nn.Module, info: ModelInfo, calibration=None, seed: int = 0) -> dict[int, np.ndarray]:
    out = {}
    for layer in info.moe_layers:
        router = model.get_submodule(layer.router)
        with onloaded(router):  # a layer a device map offloaded
            out[layer.index] = router_norms(cast(torch.Tensor, router.weight))
    return out
