"""Data-free selectors scored from a checkpoint's files, one expert at a time, for models larger than memory.

The model is built on the meta device (structure, no weights); each selector that needs weights reads them through
a :class:`~hetmoe_compile.models.checkpoint.ParameterSource`: max-neuron-norm one expert's gate/up/down tensors at
a time, router-norm each router's ``[E, H]`` weight. The arithmetic is the in-memory selectors' own (the same
functions on the same values), so the scores and placements are the same as with the loaded model.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..base.errors import HetMoEError
from ..models.checkpoint import ParameterSource
from ..models.recognize import ModelInfo
from .base import Scores, get_selector
from .max_neuron_norm import max_neuron_norms
from .router_norm import router_norms

CHECKPOINT_SELECTORS = ("max-neuron-norm", "router-norm", "random")
"""Selectors that score from the checkpoint's files without loading the model."""


def _expert(source: ParameterSource, model: nn.Module, name: str, e: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Expert ``e`` of the fused parameter ``name``, checked against the shape the model's config gives it."""
    t = source.expert(name, e)
    want = tuple(model.get_parameter(name).shape[1:])
    if tuple(t.shape) != want:
        raise HetMoEError(
            f"the checkpoint's expert {e} of {name} has shape {tuple(t.shape)}, the model's config "
            f"says {want}; the checkpoint does not match its config.json"
        )
    return _as(t, dtype)


def _max_neuron_norm(source: ParameterSource, model: nn.Module, info: ModelInfo, dtype: torch.dtype | None, seed: int):
    layout = info.adapter.layout
    out = {}
    total = sum(l.num_experts for l in info.moe_layers)
    with tqdm(
        total=total, desc="max-neuron-norm (from the checkpoint)", unit="expert", leave=False, disable=None
    ) as bar:  # on terminals only
        for layer in info.moe_layers:
            scores = np.empty(layer.num_experts)
            for e in range(layer.num_experts):
                experts = SimpleNamespace(
                    **{
                        name: _expert(source, model, f"{layer.experts}.{name}", e, dtype)[None]
                        for name in ("gate_up_proj", "down_proj")
                    }
                )
                norms = max_neuron_norms(experts, layout)
                scores[e] = float((norms["gate"] * norms["up"] * norms["down"])[0])
                bar.update()
            out[layer.index] = scores
    return out


def _router_norm(source: ParameterSource, model: nn.Module, info: ModelInfo, dtype: torch.dtype | None, seed: int):
    out = {}
    for layer in info.moe_layers:
        name = f"{layer.router}.weight"
        weight = source.read(name)
        if tuple(weight.shape) != tuple(model.get_parameter(name).shape):
            raise HetMoEError(
                f"the checkpoint's {name} has shape {tuple(weight.shape)}, the model's config says "
                f"{tuple(model.get_parameter(name).shape)}; the checkpoint does not match its config.json"
            )
        out[layer.index] = router_norms(_as(weight, dtype))
    return out


def _random(source: ParameterSource, model: nn.Module, info: ModelInfo, dtype: torch.dtype | None, seed: int):
    return get_selector("random").fn(None, info, None, seed)


_SCORERS = {"max-neuron-norm": _max_neuron_norm, "router-norm": _router_norm, "random": _random}


def _as(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def score_checkpoint(
    model: nn.Module,
    info: ModelInfo,
    source: ParameterSource,
    names: list[str],
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, Scores]:
    """Scores of the (meta-device) ``model`` under each selector in ``names``, read from ``source``; ``dtype``
    casts the read weights as loading with that dtype would (None: as stored)."""
    unknown = [n for n in names if n not in _SCORERS]
    if unknown:
        raise HetMoEError(
            f"selector(s) {', '.join(unknown)} need the loaded model; scoring from the checkpoint runs "
            f"{', '.join(CHECKPOINT_SELECTORS)} (use --load full)"
        )
    out = {}
    for name in names:
        start = time.perf_counter()
        layers = _SCORERS[name](source, model, info, dtype, seed)
        out[name] = Scores(name, layers, time.perf_counter() - start)
    return out
