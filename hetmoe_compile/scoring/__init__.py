"""Expert noise-sensitivity selectors (higher score = more sensitive = digital first)."""

from . import max_neuron_norm, router_norm, random_scores, routing_stats, expected_damage, measured  # noqa: F401,I001  (order = listing order)
from .base import Scores, Selector, check_selectors, get_selector, register_selector, selectors
from .run import score, score_all

__all__ = [
    "Scores",
    "Selector",
    "check_selectors",
    "get_selector",
    "register_selector",
    "score",
    "score_all",
    "selectors",
]
