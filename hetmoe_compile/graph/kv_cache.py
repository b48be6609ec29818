"""The graph a KV-cached export captures: ``(input_ids, attention_mask, position_ids, past) -> (logits, present)``.

One program serves prefill (past length 0) and decode (one token): the past tensors fill a plain ``DynamicCache``
(full length on every layer; sliding windows are applied by the mask), and the mask is built here as a 4-D additive
tensor, so transformers' mask shortcuts, which branch on the relation of past, sequence and mask lengths, are never
traced. Names follow ONNX Runtime GenAI: ``past_key_values.<i>.key`` / ``.value`` in, ``present.<i>.key`` /
``.value`` out, ``[batch, heads, length, dim]``, one head count and width for every tensor (what GenAI's cache
allocates). Where a layer caches tensors of different widths (DeepSeek-V3's MLA latent: ``kv_lora_rank`` wide and
``qk_rope_head_dim`` wide, one head), the two are stored concatenated and split evenly across the key and value
slots (a zero column when the sum is odd), so no bytes are spent on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..base.errors import HetMoEError


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache as the model computes it (``heads``, ``key``/``value`` widths) and as it is stored."""

    heads: int
    key: int
    value: int

    @property
    def split(self) -> bool:
        """Stored as one concatenated tensor split evenly across the two slots (the widths differ)."""
        return self.key != self.value

    @property
    def width(self) -> int:
        """The stored width of each slot."""
        return (self.key + self.value + 1) // 2 if self.split else self.key


def cache_layout(model: nn.Module) -> list[LayerCache]:
    """Each layer's cache, read from one eager cached step (the tensors a model caches are its own business)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=True)
    layout = []
    for layer in out.past_key_values.layers:
        k, v = layer.keys, layer.values
        if k.shape[1] != v.shape[1]:
            raise HetMoEError(
                f"{type(model).__name__} caches keys and values with different head counts ({k.shape[1]} and "
                f"{v.shape[1]}); the KV-cached export cannot store them: export without --kv-cache"
            )
        layout.append(LayerCache(int(k.shape[1]), int(k.shape[3]), int(v.shape[3])))
    return layout


def cache_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """``(heads, width)`` of each stored cache tensor, in :func:`past_names` order."""
    return [(c.heads, c.width) for c in cache_layout(model) for _ in ("key", "value")]


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


def _unpack(c: LayerCache, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored slots -> the model's key and value tensors."""
    if not c.split:
        return key, value
    both = torch.cat([key, value], dim=-1)
    return both[..., : c.key], both[..., c.key : c.key + c.value]


def _pack(c: LayerCache, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's key and value tensors -> stored slots."""
    if not c.split:
        return key, value
    both = torch.cat([key, value], dim=-1)
    if both.shape[-1] < 2 * c.width:
        both = torch.nn.functional.pad(both, (0, 2 * c.width - both.shape[-1]))
    return both[..., : c.width], both[..., c.width :]


class CachedLogitsModule(nn.Module):
    """``(input_ids, attention_mask, position_ids, past) -> (logits, *present)``; ``past`` is the list of stored
    cache tensors in :func:`past_names` order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = cast(Any, model).config
        self.layout = cache_layout(model)
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
        self.window = int(config.sliding_window) if sliding else None

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache()  # no config: a config's sliding layers would crop the past the mask indexes
        for i, c in enumerate(self.layout):
            cache.update(*_unpack(c, past_key_values[2 * i], past_key_values[2 * i + 1]), i)
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
        layers = out.past_key_values.layers
        return (out.logits, *[t for c, layer in zip(self.layout, layers) for t in _pack(c, layer.keys, layer.values)])
