"""Small helpers shared by the evaluators: where the model lives, how long its context is, plain token ids."""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_MAX_POSITIONS = 2048


def model_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: its input embeddings' device (their execution device when a device map
    offloads them; CPU for a parameter-less model)."""
    from ..models.device_map import input_device

    return input_device(model)


def max_positions(model: nn.Module) -> int:
    """The longest input the model takes: ``config.max_position_embeddings`` (or ``n_positions``), else 2048."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_POSITIONS


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
