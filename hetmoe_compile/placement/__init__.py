"""Placement: policy, the placement computation, and placement.json with its JSON Schema."""
from .placement import DensePlacement, ExpertPlacement, LayerPlacement, Placement, config_hash, place
from .policy import PlacementPolicy, parse_override
from .schema import SCHEMA_VERSION, placement_schema, validate_placement

__all__ = [
    "DensePlacement", "ExpertPlacement", "LayerPlacement", "Placement", "PlacementPolicy", "SCHEMA_VERSION",
    "config_hash", "parse_override", "place", "placement_schema", "validate_placement",
]
