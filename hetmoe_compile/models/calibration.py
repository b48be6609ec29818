"""Calibration text: tokenised windows, and the routing (inputs, chosen experts, weights) they produce per layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..base.errors import HetMoEError
from ..base.io import read_text_file
from .device_map import input_device
from .recognize import ModelInfo


class RoutingCapture(NamedTuple):
    """What one MoE layer's experts module received on the calibration tokens."""

    hidden: torch.Tensor  # [T, H]
    top_k_index: torch.Tensor  # [T, K]
    top_k_weights: torch.Tensor  # [T, K]


@dataclass
class Calibration:
    """Token windows ``input_ids [N, L]`` cut from a text, with the routing they produce cached per model."""

    input_ids: torch.Tensor
    source: str = ""
    _routing: dict[int, dict[int, RoutingCapture]] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def routing(self, model: nn.Module, info: ModelInfo, batch_size: int = 8) -> dict[int, RoutingCapture]:
        """Run the model once over the windows and capture each MoE layer's experts inputs.

        Cached per model object: after changing a model's weights in place, use a new :class:`Calibration`.
        """
        key = id(model)
        if key not in self._routing:
            self._routing[key] = capture_routing(model, info, self.input_ids, batch_size)
        return self._routing[key]


def calibration_from_text(
    tokenizer, text: str, window: int = 256, max_tokens: int = 8192, source: str = "<text>"
) -> Calibration:
    """Tokenise ``text`` and cut it into non-overlapping windows of ``window`` tokens (at most ``max_tokens``)."""
    if not text.strip():
        raise HetMoEError(f"{source}: calibration text is empty; give a file with some natural-language text")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    if ids.numel() < 2:
        raise HetMoEError(f"{source}: calibration text has {ids.numel()} token(s); give at least a sentence")
    window = min(window, ids.numel())
    n = ids.numel() // window
    return Calibration(ids[: n * window].reshape(n, window), source)


def read_calibration_text(path: str | Path) -> str:
    """The text of a calibration file; clear errors for missing, non-UTF-8 or empty files (check before work)."""
    return read_text_file(path, "calibration", "--calib")


def calibration_from_file(path: str | Path, tokenizer, window: int = 256, max_tokens: int = 8192) -> Calibration:
    """:func:`calibration_from_text` on a UTF-8 text file (see :func:`read_calibration_text`)."""
    return calibration_from_text(tokenizer, read_calibration_text(path), window, max_tokens, source=str(path))


def capture_routing(
    model: nn.Module, info: ModelInfo, input_ids: torch.Tensor, batch_size: int = 8
) -> dict[int, RoutingCapture]:
    """Forward ``input_ids`` through ``model`` and record, per MoE layer, what its experts module received."""
    records: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {l.index: [] for l in info.moe_layers}
    handles = []

    def make_hook(index: int):
        def hook(module, args, kwargs):
            values = list(args) + [kwargs[k] for k in kwargs]
            hidden, idx, weights = values[:3]
            records[index].append((hidden.detach().float().cpu(), idx.detach().cpu(), weights.detach().float().cpu()))

        return hook

    for layer in info.moe_layers:
        experts = model.get_submodule(layer.experts)
        handles.append(experts.register_forward_pre_hook(make_hook(layer.index), with_kwargs=True))
    device = input_device(model)
    try:
        with torch.no_grad():
            for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="calibration", unit="batch", leave=False):
                model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: RoutingCapture(*(torch.cat([r[j] for r in recs]) for j in range(3))) for i, recs in records.items()}
