"""Cost model of a placement (energy per token, throughput, digital memory) and placement under a budget.

:mod:`.params` and :mod:`.units` import without torch; the estimator and the budget search load on first use.
"""

from .params import SOURCES, CostParams, describe_params, load_cost_params
from .units import format_bytes, format_si, parse_bytes, parse_energy

_TORCH_SIDE = {
    "CostReport": "estimate",
    "Estimator": "estimate",
    "estimate_cost": "estimate",
    "format_cost": "estimate",
    "ModelProfile": "profile",
    "profile_model": "profile",
    "place_under_budget": "budget",
}

__all__ = [
    "SOURCES",
    "CostParams",
    "CostReport",
    "Estimator",
    "ModelProfile",
    "describe_params",
    "estimate_cost",
    "format_bytes",
    "format_cost",
    "format_si",
    "load_cost_params",
    "parse_bytes",
    "parse_energy",
    "place_under_budget",
    "profile_model",
]


def __getattr__(name: str):
    if name in _TORCH_SIDE:
        from importlib import import_module

        return getattr(import_module(f".{_TORCH_SIDE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
