"""Score tables and the selector registry. A selector maps a model to one score per routed expert; higher means
more noise-sensitive, so the highest-scoring experts are placed digitally."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from ..base.errors import HetMoEError
from ..models.recognize import ModelInfo


@dataclass
class Scores:
    """One selector's scores: decoder layer index -> ``[num_experts]`` array."""

    selector: str
    layers: dict[int, np.ndarray]
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def of(self, layer: int, expert: int) -> float:
        return float(self.layers[layer][expert])


SelectorFn = Callable[..., dict[int, np.ndarray]]


@dataclass(frozen=True)
class Selector:
    name: str
    fn: SelectorFn
    needs_calibration: bool
    summary: str


_SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, needs_calibration: bool, summary: str) -> Callable[[SelectorFn], SelectorFn]:
    """Decorator: register ``fn(model, info, calibration, seed) -> {layer: scores}`` under ``name``."""

    def wrap(fn: SelectorFn) -> SelectorFn:
        _SELECTORS[name] = Selector(name, fn, needs_calibration, summary)
        return fn

    return wrap


def selectors() -> dict[str, Selector]:
    """All registered selectors by name."""
    return dict(_SELECTORS)


def get_selector(name: str) -> Selector:
    if name not in _SELECTORS:
        raise HetMoEError(f"unknown selector '{name}'; valid selectors: {', '.join(_SELECTORS)}")
    return _SELECTORS[name]


def check_selectors(names: list[str], have_calibration: bool) -> None:
    """Fail early (before any work) on unknown selectors or data-driven ones without calibration text."""
    for name in names:
        sel = get_selector(name)
        if sel.needs_calibration and not have_calibration:
            raise HetMoEError(f"selector '{name}' measures routing on text: pass --calib TEXTFILE")


def layer_experts(model: nn.Module, info: ModelInfo, index: int) -> nn.Module:
    return model.get_submodule(info.layer(index).experts)
