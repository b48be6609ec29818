"""What identifies a model in the files written about it (placements, scores, results, input ranges): its config's
hash and the facts a reader checks before trusting the file."""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

from torch import nn

from .recognize import ModelInfo


def config_hash(model: nn.Module, legacy: bool = False) -> str:
    """sha256 of the model config (sorted JSON, without the transformers version and without ``_name_or_path``,
    the path it was loaded from: the same model loaded as ``./m`` and ``/abs/m`` has one hash). ``legacy``: the
    hash placements written before 2026-12-02 carry, with the load path in it."""
    config = cast(Any, model).config  # a Hugging Face config
    skip = {"transformers_version"} if legacy else {"transformers_version", "_name_or_path"}
    cfg = {k: v for k, v in config.to_dict().items() if k not in skip}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model: nn.Module, info: ModelInfo, source: str) -> dict:
    return {
        "source": source,
        "architecture": info.architecture,
        "model_type": info.model_type,
        "family": info.family,
        "config_sha256": config_hash(model),
        "num_layers": info.num_layers,
        "moe_layers": [l.index for l in info.moe_layers],
        "num_experts": info.moe_layers[0].num_experts,
        "top_k": info.moe_layers[0].top_k,
    }
