"""Routing under noise against the clean model, per MoE layer: does analog noise upstream change which experts the
(digital) routers pick, how the load spreads over experts, and how far each layer's routed-expert output moves?

The clean reference is captured once, on the model before any placement, peer or quantisation (the original
experts modules or canonical ones: both take ``(hidden, top_k_index, top_k_weights)``); each hardware instance
(or low-bit digital model) is then run on the same tokens and compared layer by layer:

- ``topk_match``: share of tokens whose set of top-k experts equals the clean one;
- ``top1_match``: share of tokens whose highest-weighted expert equals the clean one;
- ``load_kl``: KL divergence (nats) of the expert load (share of routed (token, slot) pairs per expert) from the
  clean load, ``sum_e q_e log(q_e / p_e)`` with both smoothed by 1e-6;
- ``load_entropy``: entropy (nats) of the load (the clean one is in the reference);
- ``moe_rel_error``: ``||y - y_clean||_F / ||y_clean||_F`` of the layer's routed-expert output over all tokens.

Keys are ``routing/L<layer>/<name>`` and, averaged over layers, ``routing/<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models.calibration import calibration_from_text
from ..models.device_map import input_device
from ..models.recognize import ModelInfo

NAMES = ("topk_match", "top1_match", "load_kl", "load_entropy", "moe_rel_error")
PREFIX = "routing/"
SMOOTHING = 1e-6
WINDOW = 256


@dataclass
class LayerRecord:
    """What one layer's experts module received and returned on the reference tokens."""

    top_k_index: torch.Tensor  # [T, K]
    top_k_weights: torch.Tensor  # [T, K]
    output: torch.Tensor  # [T, H] float32, on the host


@dataclass
class RoutingReference:
    """The clean model's routing on ``input_ids [N, L]``."""

    input_ids: torch.Tensor
    layers: dict[int, LayerRecord]
    num_experts: dict[int, int]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def clean_entropy(self) -> dict[int, float]:
        return {i: _entropy(_load(r.top_k_index, self.num_experts[i])) for i, r in self.layers.items()}


def _capture(model: nn.Module, info: ModelInfo, input_ids: torch.Tensor, batch_size: int) -> dict[int, LayerRecord]:
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {l.index: [] for l in info.moe_layers}
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def pre(index: int):
        def hook(module, args, kwargs):
            values = list(args) + list(kwargs.values())
            seen[index] = (values[1].detach().cpu(), values[2].detach().float().cpu())

        return hook

    def post(index: int):
        def hook(module, args, kwargs, output):
            idx, weights = seen.pop(index)
            parts[index].append((idx, weights, output.detach().float().cpu()))

        return hook

    for layer in info.moe_layers:
        experts = model.get_submodule(layer.experts)
        handles.append(experts.register_forward_pre_hook(pre(layer.index), with_kwargs=True))
        handles.append(experts.register_forward_hook(post(layer.index), with_kwargs=True))
    device = input_device(model)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: LayerRecord(*(torch.cat([p[j] for p in ps]) for j in range(3))) for i, ps in parts.items()}


def reference_from_ids(
    model: nn.Module, info: ModelInfo, input_ids: torch.Tensor, batch_size: int = 8
) -> RoutingReference:
    """The model's routing (as it is now: the clean model) on token windows ``input_ids [N, L]``."""
    return RoutingReference(
        input_ids, _capture(model, info, input_ids, batch_size), {l.index: l.num_experts for l in info.moe_layers}
    )


def routing_reference(
    model: nn.Module, info: ModelInfo, tokenizer, text: str, tokens: int, batch_size: int = 8, source: str = "<text>"
) -> RoutingReference:
    """The clean model's routing on the first ``tokens`` tokens of ``text`` (windows of 256)."""
    ids = calibration_from_text(tokenizer, text, window=WINDOW, max_tokens=tokens, source=source).input_ids
    return reference_from_ids(model, info, ids, batch_size)


def _load(top_k_index: torch.Tensor, num_experts: int) -> np.ndarray:
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).double()
    return (counts / counts.sum().clamp(min=1)).numpy()


def _entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def _top1(idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return idx.gather(1, weights.argmax(1, keepdim=True)).squeeze(1)


def routing_diagnostics(model: nn.Module, info: ModelInfo, ref: RoutingReference, batch_size: int = 8) -> dict:
    """The model as it is now (a hardware instance, low-bit experts) against ``ref``: ``{key: value}``."""
    now = _capture(model, info, ref.input_ids, batch_size)
    out: dict[str, float] = {}
    for index, clean in ref.layers.items():
        got = now[index]
        e = ref.num_experts[index]
        same_set = (got.top_k_index.sort(1).values == clean.top_k_index.sort(1).values).all(1)
        p = _load(clean.top_k_index, e) + SMOOTHING
        q = _load(got.top_k_index, e) + SMOOTHING
        p, q = p / p.sum(), q / q.sum()
        denom = torch.linalg.vector_norm(clean.output).clamp(min=1e-30)
        values = {
            "topk_match": float(same_set.double().mean()),
            "top1_match": float(
                (_top1(got.top_k_index, got.top_k_weights) == _top1(clean.top_k_index, clean.top_k_weights))
                .double()
                .mean()
            ),
            "load_kl": float((q * np.log(q / p)).sum()),
            "load_entropy": _entropy(_load(got.top_k_index, e)),
            "moe_rel_error": float(torch.linalg.vector_norm(got.output - clean.output) / denom),
        }
        for name, v in values.items():
            out[f"{PREFIX}L{index}/{name}"] = v
    for name in NAMES:
        out[PREFIX + name] = float(np.mean([out[f"{PREFIX}L{i}/{name}"] for i in ref.layers]))
    return out


def is_routing_key(key: str) -> bool:
    """Whether a metric key is a routing diagnostic (``routing/...``, also after a time prefix ``t=1h/``)."""
    return key.startswith(PREFIX) or f"/{PREFIX}" in key


def layer_series(metrics: dict[str, dict], name: str, prefix: str = "") -> tuple[list[int], list[float]]:
    """``(layers, means)`` of one diagnostic from a results ``metrics`` dict (keys ``<prefix>routing/L<i>/<name>``)."""
    pairs = []
    for key, stats in metrics.items():
        if key.startswith(prefix + PREFIX + "L") and key.endswith("/" + name):
            layer = int(key[len(prefix + PREFIX) + 1 :].split("/", 1)[0])
            pairs.append((layer, stats["mean"]))
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]
