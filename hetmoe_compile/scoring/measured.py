"""Empirical oracle: how much the MoE layer's routed output changes on calibration tokens when only one expert's
weights carry PCM programming noise (averaged over seeds). Expensive-ish, but exact for the question asked."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..analog.programming_noise import program_rows, stream_seed
from ..ir.expert_group import ExpertGroup, HetExperts, expert_mlp
from ..models.calibration import Calibration
from ..models.expert_weights import activation_params, canonical_expert_weights
from ..models.recognize import ModelInfo
from .base import register_selector

MEASURED_SEEDS = 3
MEASURED_NOISE_SCALE = 1.0


def _expert_weights(
    experts: nn.Module, info: ModelInfo, e: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if isinstance(experts, HetExperts):
        for module in experts.groups.values():
            group = cast(ExpertGroup, module)  # a canonical layer's groups (ExpertGroup API)
            ids = group.ids
            if e in ids:
                return group.expert(ids.index(e))
    device = cast(torch.Tensor, experts.down_proj).device
    w = canonical_expert_weights(experts, info.adapter.layout, torch.tensor([e], device=device))
    return (
        w.gate_up[0],
        w.down[0],
        None if w.gate_up_bias is None else w.gate_up_bias[0],
        None if w.down_bias is None else w.down_bias[0],
    )


def measured_sensitivity(
    model: nn.Module,
    info: ModelInfo,
    calibration: Calibration,
    seed: int = 0,
    seeds: int = MEASURED_SEEDS,
    noise_scale: float = MEASURED_NOISE_SCALE,
) -> dict[int, np.ndarray]:
    """Relative change ``||delta||_F / ||y||_F`` of each layer's routed-expert output when one expert is noisy."""
    act = (info.adapter.layout.activation, *activation_params(model.config))
    routing = calibration.routing(model, info)
    out: dict[int, np.ndarray] = {}
    total = sum(l.num_experts for l in info.moe_layers)
    bar = tqdm(total=total, desc="measured", unit="expert", leave=False)
    with torch.no_grad():
        for layer in info.moe_layers:
            experts = model.get_submodule(layer.experts)
            cap = routing[layer.index]
            dev = next(experts.parameters()).device
            dtype = next(experts.parameters()).dtype
            hidden = cap.hidden.to(dev, dtype)
            y = experts(hidden, cap.top_k_index.to(dev), cap.top_k_weights.to(dev, dtype)).float()
            denom = torch.linalg.vector_norm(y).clamp(min=1e-30).item()
            scores = np.zeros(layer.num_experts)
            for e in range(layer.num_experts):
                tok, slot = torch.nonzero(cap.top_k_index == e, as_tuple=True)
                if tok.numel():
                    w = _expert_weights(experts, info, e)
                    x = hidden[tok.to(dev)]
                    weight = cap.top_k_weights[tok, slot].to(dev, torch.float32)[:, None]
                    clean = expert_mlp(x, *w, *act).float()
                    changes = []
                    for s in range(seeds):
                        noisy_w = (
                            program_rows(w[0], stream_seed(seed, s, layer.index, e, 0), noise_scale),
                            program_rows(w[1], stream_seed(seed, s, layer.index, e, 1), noise_scale),
                            w[2],
                            w[3],
                        )
                        noisy = expert_mlp(x, *noisy_w, *act).float()
                        changes.append(torch.linalg.vector_norm(weight * (noisy - clean)).item() / denom)
                    scores[e] = float(np.mean(changes))
                bar.update(1)
            out[layer.index] = scores
    bar.close()
    return out


@register_selector("measured", True, "oracle: relative change of the layer output with only this expert noisy")
def score_measured(model: nn.Module, info: ModelInfo, calibration: Calibration, seed: int = 0):
    return measured_sensitivity(model, info, calibration, seed)
