"""Graph passes over captured FX graphs: one file per pass (``<verb>_<noun>_pass.py``)."""

from .annotate_placement_pass import AnnotatePlacementPass
from .pass_base import PLACEMENT_META, NodePlacement, PassError, is_expert_group
from .recognize_experts_pass import RecognizeExpertsPass
from .rewrite_analog_pass import RewriteAnalogPass
from .split_expert_groups_pass import SplitExpertGroupsPass

__all__ = [
    "AnnotatePlacementPass",
    "NodePlacement",
    "PLACEMENT_META",
    "PassError",
    "RecognizeExpertsPass",
    "RewriteAnalogPass",
    "SplitExpertGroupsPass",
    "is_expert_group",
]
