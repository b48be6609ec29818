"""Swap each fused experts module for a :class:`HetExperts` (a digital and an analog expert group).

The swap happens before tracing, at the experts interface ``experts(hidden, top_k_index, top_k_weights)``, so it
is model-agnostic and leaves routing bit-identical; without noise the canonical model's logits equal the original's.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .expert_group import DEVICES, ExpertGroup, HetExperts
from .models.expert_weights import canonical_expert_weights
from .models.recognize import ModelInfo, recognize

DeviceMap = Mapping[int, Mapping[int, str]]
"""Decoder layer index -> expert id -> ``"digital"`` | ``"analog"``."""


def _act_params(model: nn.Module) -> tuple[str, float, float]:
    config = model.config
    return (
        getattr(config, "hidden_act", "silu") or "silu",
        float(getattr(config, "swiglu_alpha", 0.0) or 0.0),
        float(getattr(config, "swiglu_limit", 0.0) or 0.0),
    )


def canonicalize(model: nn.Module, devices: DeviceMap | None = None, info: ModelInfo | None = None) -> nn.Module:
    """Replace, in place, every routed-experts module of ``model`` by a :class:`HetExperts`.

    ``devices`` gives each expert's device (missing experts are digital). A model that is already canonical is
    re-split to the new devices; a layer already split that way is left as it is (no weight copies, and any state
    of its groups, such as low-bit quantisation, is kept). Returns ``model``.
    """
    info = info or recognize(model)
    _check_devices(devices or {}, info)
    act_name, alpha, limit = _act_params(model)
    layout = info.adapter.layout
    for layer in info.moe_layers:
        experts = model.get_submodule(layer.experts)
        layer_devices = dict((devices or {}).get(layer.index, {}))
        bad = {d for d in layer_devices.values() if d not in DEVICES}
        if bad:
            raise ValueError(f"layer {layer.index}: unknown device(s) {sorted(bad)}; use one of {DEVICES}")
        wanted = {d: [e for e in range(layer.num_experts) if layer_devices.get(e, "digital") == d] for d in DEVICES}
        if _split_as(experts, {d: ids for d, ids in wanted.items() if ids}):
            continue
        if isinstance(experts, HetExperts):
            experts = _fuse_groups(experts)
            source_layout = type(layout)(has_bias=layout.has_bias, activation=layout.activation)
        else:
            source_layout = layout
        groups: dict[str, ExpertGroup] = {}
        for device, ids in wanted.items():
            if not ids:
                continue
            id_tensor = torch.tensor(ids, dtype=torch.long, device=experts.down_proj.device)
            weights = canonical_expert_weights(experts, source_layout, id_tensor)
            groups[device] = ExpertGroup(weights, id_tensor, layer.num_experts, device, layout, act_name, alpha, limit)
        parent_path, attr = layer.experts.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), attr, HetExperts(groups, layer.num_experts, layer.index))
    return model


def _split_as(experts: nn.Module, wanted: dict[str, list[int]]) -> bool:
    """True if ``experts`` is a :class:`HetExperts` of plain expert groups holding exactly ``wanted``."""
    if not isinstance(experts, HetExperts) or set(experts.groups) != set(wanted):
        return False
    return all(type(g) is ExpertGroup and g.ids == wanted[d] for d, g in experts.groups.items())


def _check_devices(devices: DeviceMap, info: ModelInfo) -> None:
    """Reject keys that would otherwise be ignored silently (and leave experts digital)."""
    layers = {l.index: l.num_experts for l in info.moe_layers}
    for layer, experts in devices.items():
        if not isinstance(layer, int) or layer not in layers:
            raise ValueError(f"device map names layer {layer!r}, but the MoE layers are {sorted(layers)} (int keys)")
        for e in experts:
            if not isinstance(e, int) or not 0 <= e < layers[layer]:
                raise ValueError(f"device map names expert {e!r} of layer {layer}; experts are 0..{layers[layer] - 1}")


class _Fused(nn.Module):
    """Canonical fused tensors rebuilt from the groups of a :class:`HetExperts` (used when re-splitting)."""

    def __init__(self, het: HetExperts) -> None:
        super().__init__()
        groups = list(het.groups.values())
        ids = torch.cat([g.expert_ids for g in groups])
        order = torch.argsort(ids)
        self.gate_up_proj = torch.cat([g.gate_up for g in groups])[order]
        self.down_proj = torch.cat([g.down for g in groups])[order]
        if groups[0].gate_up_bias is not None:
            self.gate_up_proj_bias = torch.cat([g.gate_up_bias for g in groups])[order]
            self.down_proj_bias = torch.cat([g.down_bias for g in groups])[order]


def _fuse_groups(het: HetExperts) -> nn.Module:
    return _Fused(het)
