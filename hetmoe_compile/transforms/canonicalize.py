"""Swap each fused experts module for a :class:`HetExperts` (a digital and an analog expert group).

The swap happens before tracing, at the experts interface ``experts(hidden, top_k_index, top_k_weights)``, so it
is model-agnostic and leaves routing bit-identical; without noise the canonical model's logits equal the original's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, cast

import torch
from torch import nn

from ..ir.expert_group import DEVICES, ExpertGroup, HetExperts
from ..models.device_map import onloaded
from ..models.expert_weights import ExpertWeights, activation_params, canonical_expert_weights
from ..models.recognize import ModelInfo, recognize

DeviceMap = Mapping[int, Mapping[int, str]]
"""Decoder layer index -> expert id -> ``"digital"`` | ``"analog"``."""


def canonicalize(model: nn.Module, devices: DeviceMap | None = None, info: ModelInfo | None = None) -> nn.Module:
    """Replace, in place, every routed-experts module of ``model`` by a :class:`HetExperts`.

    ``devices`` gives each expert's device (missing experts are digital). A model that is already canonical is
    re-split to the new devices; a layer already split that way is left as it is (no weight copies, and any state
    of its groups, such as low-bit quantisation, is kept). Returns ``model``.
    """
    info = info or recognize(model)
    _check_devices(devices or {}, info)
    act_name, alpha, limit = activation_params(model.config)
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
        groups: dict[str, ExpertGroup] = {}
        with onloaded(experts):  # an offloaded layer: its expert groups are built resident on its device
            views = _partition_in_place(experts, layout, wanted)
            if views is None:
                if isinstance(experts, HetExperts):
                    experts = _fuse_groups(experts)
                    source_layout = type(layout)(has_bias=layout.has_bias, activation=layout.activation)
                else:
                    source_layout = layout
            for device, ids in wanted.items():
                if not ids:
                    continue
                id_tensor = torch.tensor(
                    ids,
                    dtype=torch.long,
                    device=cast(torch.Tensor, experts.down_proj).device if views is None else views[device].down.device,
                )
                weights = (
                    views[device] if views is not None else canonical_expert_weights(experts, source_layout, id_tensor)
                )
                groups[device] = ExpertGroup(
                    weights, id_tensor, layer.num_experts, device, layout.activation, act_name, alpha, limit
                )
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


_FUSED = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
_CANONICAL = ("gate_up", "down", "gate_up_bias", "down_bias")


def _partition_in_place(experts: nn.Module, layout, wanted: dict[str, list[int]]) -> dict[str, ExpertWeights] | None:
    """Reorder the experts of fused tensors already in canonical layout (not transposed, not interleaved) in place,
    each device's experts contiguous, and return each device's weights as views: no copy of the layer, so the
    peak memory of canonicalising is one expert more than the model. Also re-splits a :class:`HetExperts` made this
    way (its groups' tensors tile one storage). ``None`` where this does not apply (then the caller copies)."""
    tensors: list[torch.Tensor | None]
    if isinstance(experts, HetExperts):
        modules = list(experts.groups.values())
        if not modules or any(type(g) is not ExpertGroup for g in modules):
            return None
        groups = cast(list[ExpertGroup], modules)  # checked just above
        current = [e for g in groups for e in g.ids]
        wholes = [_whole([getattr(g, n) for g in groups]) for n in _CANONICAL]
        if any(t is False for t in wholes):
            return None
        tensors = cast(list[torch.Tensor | None], wholes)  # no False left (checked just above)
    else:
        if layout.transposed or layout.interleaved:
            return None
        current = list(range(cast(torch.Tensor, experts.down_proj).shape[0]))
        tensors = [getattr(experts, n, None) if layout.has_bias or not n.endswith("bias") else None for n in _FUSED]
        if any(t is not None and not t.is_contiguous() for t in tensors):
            return None
    order = [e for ids in wanted.values() for e in ids]
    if sorted(order) != sorted(current):
        return None
    position = {e: i for i, e in enumerate(current)}
    source = [position[e] for e in order]  # new slot i takes the expert now in slot source[i]
    with torch.no_grad():
        for t in tensors:
            if t is not None:
                _permute_rows(t, source)
    out: dict[str, ExpertWeights] = {}
    start = 0
    for device, ids in wanted.items():
        if ids:
            stop = start + len(ids)
            gate_up, down, gate_up_bias, down_bias = [None if t is None else t.detach()[start:stop] for t in tensors]
            assert gate_up is not None and down is not None  # recognised experts (and expert groups) always have them
            out[device] = ExpertWeights(gate_up, down, gate_up_bias, down_bias)
            start = stop
    return out


def _whole(parts: list[torch.Tensor | None]) -> torch.Tensor | None | Literal[False]:
    """The tensor that the consecutive, contiguous views ``parts`` tile (all None: None; anything else: False)."""
    if all(p is None for p in parts):
        return None
    if any(p is None or not p.is_contiguous() for p in parts):
        return False
    tensors = cast(list[torch.Tensor], parts)  # none is None (checked just above)
    first = tensors[0]
    step = first[0].numel()
    offset = first.storage_offset()
    for p in tensors:
        if p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or p.storage_offset() != offset:
            return False
        offset += p.shape[0] * step
    rows = sum(p.shape[0] for p in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _permute_rows(t: torch.Tensor, source: list[int]) -> None:
    """``t[i] = t[source[i]]`` for every ``i``, in place, cycle by cycle with one row of extra memory."""
    done = [False] * len(source)
    for i in range(len(source)):
        if done[i] or source[i] == i:
            done[i] = True
            continue
        saved = t[i].clone()
        j = i
        while True:
            done[j] = True
            k = source[j]
            if k == i:
                t[j].copy_(saved)
                break
            t[j].copy_(t[k])
            j = k


class _Fused(nn.Module):
    """Canonical fused tensors rebuilt from the groups of a :class:`HetExperts` (used when re-splitting)."""

    def __init__(self, het: HetExperts) -> None:
        super().__init__()
        groups = cast(list[ExpertGroup], list(het.groups.values()))  # fusing reads expert groups' tensors
        ids = torch.cat([g.expert_ids for g in groups])
        order = torch.argsort(ids)
        self.gate_up_proj = torch.cat([g.gate_up for g in groups])[order]
        self.down_proj = torch.cat([g.down for g in groups])[order]
        if groups[0].gate_up_bias is not None:  # the groups of a layer share its layout: all have biases
            self.gate_up_proj_bias = torch.cat(cast(list[torch.Tensor], [g.gate_up_bias for g in groups]))[order]
            self.down_proj_bias = torch.cat(cast(list[torch.Tensor], [g.down_bias for g in groups]))[order]


def _fuse_groups(het: HetExperts) -> nn.Module:
    return _Fused(het)
