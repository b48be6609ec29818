"""Run selectors and time them."""

from __future__ import annotations

import time

from torch import nn

from ..models.calibration import Calibration
from ..models.recognize import ModelInfo
from .base import Scores, check_selectors, get_selector


def score(
    model: nn.Module, info: ModelInfo, selector: str, calibration: Calibration | None = None, seed: int = 0
) -> Scores:
    """Scores of every routed expert under ``selector``."""
    check_selectors([selector], calibration is not None)
    sel = get_selector(selector)
    start = time.perf_counter()
    layers = sel.fn(model, info, calibration, seed)
    return Scores(selector, layers, time.perf_counter() - start)


def score_all(
    model: nn.Module, info: ModelInfo, names: list[str], calibration: Calibration | None = None, seed: int = 0
) -> dict[str, Scores]:
    """:func:`score` for each name, checking all names first so that a typo fails before any work."""
    check_selectors(names, calibration is not None)
    return {name: score(model, info, name, calibration, seed) for name in names}
