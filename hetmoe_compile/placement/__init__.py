"""Placement: policy, the placement computation, and placement.json with its JSON Schema.

The policy and schema import without torch (the CLI's ``run`` command needs them on a torch-free host); the
placement computation, which reads model weights, is imported on first use.
"""

from .policy import PlacementPolicy, parse_override
from .schema import SCHEMA_VERSION, placement_schema, validate_placement

_TORCH_SIDE = ("DensePlacement", "ExpertPlacement", "LayerPlacement", "Placement", "config_hash", "place")

__all__ = [
    "DensePlacement",
    "ExpertPlacement",
    "LayerPlacement",
    "Placement",
    "PlacementPolicy",
    "SCHEMA_VERSION",
    "config_hash",
    "parse_override",
    "place",
    "placement_schema",
    "validate_placement",
]


def __getattr__(name: str):
    if name in _TORCH_SIDE:
        from . import placement

        return getattr(placement, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
