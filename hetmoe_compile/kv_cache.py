"""The graph a KV-cached export captures: ``(input_ids, attention_mask, position_ids, past) -> (logits, present)``.

One program serves prefill (past length 0) and decode (one token): the past tensors fill a plain ``DynamicCache``
(full length on every layer; sliding windows are applied by the mask), and the mask is built here as a 4-D additive
tensor, so transformers' mask shortcuts, which branch on the relation of past, sequence and mask lengths, are never
traced. Names follow ONNX Runtime GenAI: ``past_key_values.<i>.key`` / ``.value`` in, ``present.<i>.key`` /
``.value`` out, ``[batch, heads, length, dim]``. Cache shapes come from the model itself (DeepSeek-V3 caches its
MLA latent: one head, key and value widths differ).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def cache_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """``(heads, dim)`` of each cache tensor, in :func:`past_names` order, read from one eager cached step."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=True)
    return [
        (int(t.shape[1]), int(t.shape[3])) for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
    ]


def causal_mask(attention_mask: torch.Tensor, seq: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``[batch, 1, seq, total]`` additive mask for the last ``seq`` of ``total`` positions: causal, within
    ``window`` when given, and off where ``attention_mask`` is 0 (``finfo.min``, so padded rows stay finite)."""
    total = attention_mask.shape[1]
    kv = torch.arange(total, device=attention_mask.device)
    q = kv[total - seq :]
    ok = kv[None, :] <= q[:, None]
    if window is not None:
        ok = ok & (q[:, None] - kv[None, :] < window)
    ok = ok[None, None] & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(ok, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device))


class CachedLogitsModule(nn.Module):
    """``(input_ids, attention_mask, position_ids, past) -> (logits, *present)``; ``past`` is the list of cache
    tensors in :func:`past_names` order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = cast(Any, model).config
        self.layers = int(config.num_hidden_layers)
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
        self.window = int(config.sliding_window) if sliding else None

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache()  # no config: a config's sliding layers would crop the past the mask indexes
        for i in range(self.layers):
            cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
        seq, dtype = input_ids.shape[1], next(self.model.parameters()).dtype
        full = causal_mask(attention_mask, seq, None, dtype)
        mask: Any = full
        if self.window is not None:
            mask = {"full_attention": full, "sliding_attention": causal_mask(attention_mask, seq, self.window, dtype)}
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])
