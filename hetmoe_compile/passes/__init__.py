"""Graph passes over captured FX graphs: one file per pass (``<verb>_<noun>_pass.py``)."""
from .annotate_placement_pass import AnnotatePlacementPass
from .rewrite_analog_pass import RewriteAnalogPass
from .pass_base import PLACEMENT_META, NodePlacement, PassError, is_expert_group

__all__ = ["AnnotatePlacementPass", "RewriteAnalogPass", "NodePlacement", "PLACEMENT_META", "PassError", "is_expert_group"]
