"""ROMER expert replacement: under-activated analog experts take the weights of frequently used ones.

Each expert's activation frequency (its share of the routed (token, slot) pairs) is measured on the calibration
tokens under noise (hardware instances ``seeds``, pooled). In each MoE layer the analog experts below
``threshold / E`` (``threshold`` times the uniform share) are under-activated; the least used takes a copy of the
most used expert of the layer (any device), the second least the second most, and so on (sources are never
under-activated themselves; with more under-activated experts than sources, the sources are reused in turn).
Router rows are unchanged: tokens routed to a replaced expert run the popular expert's function on the replaced
expert's own crossbars (devices depend on the expert id, so the replica is an independent hardware instance).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from ...analog.config import AnalogConfig
from ...analog.simulate import AnalogExpertGroup, restore_digital
from ...base.errors import HetMoEError
from ...ir.expert_group import ExpertGroup, HetExperts
from ...models.calibration import Calibration
from ...models.recognize import ModelInfo
from .collect import check_canonical, check_inputs, preserved_state, router_outputs
from .router_calibration import DEFAULT_SEEDS

WEIGHTS = ("gate_up", "down", "gate_up_bias", "down_bias")


@dataclass
class Replacement:
    """One replaced expert: ``expert`` of ``layer`` now holds ``source``'s weights. Frequencies are shares of the
    routed (token, slot) pairs on the calibration tokens, under noise and clean. ``original`` keeps the replaced
    weights (``gate_up, down, gate_up_bias, down_bias``) for :func:`restore_replaced_experts`."""

    layer: int
    expert: int
    source: int
    source_device: str
    frequency: float
    source_frequency: float
    clean_frequency: float
    source_clean_frequency: float
    original: tuple[torch.Tensor | None, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "layer",
                "expert",
                "source",
                "source_device",
                "frequency",
                "source_frequency",
                "clean_frequency",
                "source_clean_frequency",
            )
        }


def _ideal(group: nn.Module) -> ExpertGroup:
    return group.source if isinstance(group, AnalogExpertGroup) else cast(ExpertGroup, group)


def _locate(het: HetExperts, expert: int) -> tuple[str, ExpertGroup, int]:
    """``(device, ideal group, local index)`` of ``expert``."""
    for device, group in het.groups.items():
        ids = _ideal(group).ids
        if expert in ids:
            return device, _ideal(group), ids.index(expert)
    raise KeyError(f"expert {expert} is in no group of layer {het.layer_index}")


def _weights(group: ExpertGroup, local: int) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if getattr(group, n) is None else getattr(group, n)[local] for n in WEIGHTS)


@contextmanager
def _ideal_weights(model: nn.Module, info: ModelInfo) -> Iterator[None]:
    """A block that edits the ideal expert weights: the model is restored for it (a simulated model's weight
    storage holds programmed tiles) and simulated again after it, the same instance programmed from the new
    weights."""
    with preserved_state(model, info):
        restore_digital(model, info)
        yield


def activation_frequencies(
    model: nn.Module,
    info: ModelInfo,
    calibration: Calibration | None,
    cfg: AnalogConfig,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    batch_size: int = 8,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """``(clean, noisy)``: MoE layer -> ``[E]`` float64 share of routed (token, slot) pairs per expert on the
    calibration tokens, clean and pooled over the hardware instances ``seeds``. The model is left as it came."""
    check_canonical(model, info, "activation_frequencies")
    seeds = check_inputs(calibration, seeds, batch_size, "activation_frequencies")
    assert calibration is not None  # check_inputs raised otherwise
    clean, noisy = router_outputs(
        model, info, calibration, cfg, seeds, batch_size, keep_logits=False, desc="ROMER expert usage"
    )
    return clean.frequencies(), noisy.frequencies()


@torch.no_grad()
def replace_underused_experts(
    model: nn.Module,
    info: ModelInfo,
    calibration: Calibration | None,
    cfg: AnalogConfig,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    threshold: float = 0.25,
    max_per_layer: int | None = None,
    batch_size: int = 8,
) -> list[Replacement]:
    """Replace the under-activated analog experts of a canonical, placed model (in place; see the module
    docstring). ``max_per_layer`` caps the replacements per layer (least used first). A simulated model is
    re-programmed from the new weights. Returns one :class:`Replacement` per replaced expert."""
    if not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) <= 1.0:
        raise HetMoEError(
            f"ROMER threshold must be in (0, 1] (a fraction of the uniform share 1/E), got "
            f"{threshold}; the default is 0.25"
        )
    if max_per_layer is not None and max_per_layer < 0:
        raise HetMoEError(f"max_per_layer must be >= 0 or None (no cap), got {max_per_layer}")
    check_canonical(model, info, "replace_underused_experts")
    clean, noisy = activation_frequencies(model, info, calibration, cfg, seeds, batch_size)
    with _ideal_weights(model, info):
        return _replace(model, info, clean, noisy, float(threshold), max_per_layer)


def _replace(
    model: nn.Module, info: ModelInfo, clean: dict, noisy: dict, threshold: float, max_per_layer: int | None
) -> list[Replacement]:
    replacements: list[Replacement] = []
    for layer in info.moe_layers:
        het = model.get_submodule(layer.experts)
        assert isinstance(het, HetExperts)  # check_canonical
        if "analog" not in het.groups:
            continue
        freq, clean_freq = noisy[layer.index], clean[layer.index]
        bound = float(threshold) / layer.num_experts
        analog = _ideal(het.groups["analog"]).ids
        under = sorted((e for e in analog if float(freq[e]) < bound), key=lambda e: (float(freq[e]), e))
        if max_per_layer is not None:
            under = under[:max_per_layer]
        if not under:
            continue
        sources = sorted(
            (e for e in range(layer.num_experts) if e not in set(under)), key=lambda e: (-float(freq[e]), e)
        )
        snapshot: dict[int, tuple[str, tuple[torch.Tensor | None, ...]]] = {}
        for e in sources[: len(under)]:  # copies: a source may share its group's tensors with a target
            device, group, local = _locate(het, e)
            snapshot[e] = device, tuple(None if w is None else w.clone() for w in _weights(group, local))
        for i, expert in enumerate(under):
            source = sources[i % len(sources)]
            _, group, local = _locate(het, expert)
            target = _weights(group, local)
            original = tuple(None if w is None else w.clone() for w in target)
            source_device, source_weights = snapshot[source]
            for dst, src in zip(target, source_weights):
                if dst is not None:
                    assert src is not None  # the groups of a layer share its layout
                    dst.copy_(src)
            replacements.append(
                Replacement(
                    layer.index,
                    expert,
                    source,
                    source_device,
                    float(freq[expert]),
                    float(freq[source]),
                    float(clean_freq[expert]),
                    float(clean_freq[source]),
                    original,
                )
            )
    return replacements


@torch.no_grad()
def restore_replaced_experts(model: nn.Module, info: ModelInfo, replacements: Sequence[Replacement]) -> nn.Module:
    """Undo :func:`replace_underused_experts` exactly (in place; a simulated model is re-programmed). Returns
    ``model``."""
    check_canonical(model, info, "restore_replaced_experts")
    for r in replacements:
        if not r.original:
            raise HetMoEError(
                f"replacement of expert {r.expert} in layer {r.layer} carries no original weights "
                "(it was read back from a record); restore the model from its checkpoint instead"
            )
    with _ideal_weights(model, info):
        for r in reversed(list(replacements)):
            het = model.get_submodule(info.layer(r.layer).experts)
            assert isinstance(het, HetExperts)  # check_canonical
            _, group, local = _locate(het, r.expert)
            for dst, src in zip(_weights(group, local), r.original):
                if dst is not None:
                    assert src is not None  # the weights were read from this same layout
                    dst.copy_(src)
    return model
