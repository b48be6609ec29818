"""Read a family's fused expert tensors in the canonical ``[out_features, in_features]`` form."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..ir.expert_group import ExpertWeights
from .adapter import ExpertLayout

__all__ = ["ExpertWeights", "activation_params", "canonical_expert_weights"]


def activation_params(config) -> tuple[str, float, float]:
    """``(act_name, alpha, limit)`` of a family's expert activation from its config (GPT-OSS's clamped swiglu
    reads ``swiglu_alpha`` and ``swiglu_limit``; 0 elsewhere)."""
    return (
        getattr(config, "hidden_act", "silu") or "silu",
        float(getattr(config, "swiglu_alpha", 0.0) or 0.0),
        float(getattr(config, "swiglu_limit", 0.0) or 0.0),
    )


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Even (gate) entries first, then odd (up) entries, along ``dim``."""
    idx = torch.arange(t.shape[dim], device=t.device)
    order = torch.cat([idx[0::2], idx[1::2]])
    return t.index_select(dim, order)


def canonical_expert_weights(experts: nn.Module, layout: ExpertLayout, ids: torch.Tensor) -> ExpertWeights:
    """Copy the experts ``ids`` out of the fused tensors of ``experts`` in canonical form."""
    with torch.no_grad():
        gate_up = cast(torch.Tensor, experts.gate_up_proj).detach().index_select(0, ids)
        down = cast(torch.Tensor, experts.down_proj).detach().index_select(0, ids)
        gate_up_bias = down_bias = None
        if layout.has_bias:
            gate_up_bias = cast(torch.Tensor, experts.gate_up_proj_bias).detach().index_select(0, ids)
            down_bias = cast(torch.Tensor, experts.down_proj_bias).detach().index_select(0, ids)
        if layout.transposed:
            gate_up = gate_up.transpose(1, 2)
            down = down.transpose(1, 2)
        if layout.interleaved:
            gate_up = _deinterleave(gate_up, 1)
            if gate_up_bias is not None:
                gate_up_bias = _deinterleave(gate_up_bias, 1)
        return ExpertWeights(
            gate_up.contiguous(),
            down.contiguous(),
            None if gate_up_bias is None else gate_up_bias.contiguous(),
            None if down_bias is None else down_bias.contiguous(),
        )
