"""Expected damage: the paper's per-token sensitivity (max neuron norm) times the routed traffic that carries it.

Rationale. The paper's argument is that under weight noise an expert's output error for one token grows with its
largest neuron norms (the product over gate, up and down: ``max-neuron-norm``); it is data-free and says nothing
about how often, or how strongly, the router uses the expert. A layer's output is ``sum_k w_tk * expert_k(x_t)``, so
the error one noisy expert adds to it is ``w_t * delta(x_t)`` on each token routed to it, with ``delta`` growing
like its max neuron norm ``S``. Programming noise is fixed once per device: the same weight deviation reaches every
token the expert sees, so these errors are correlated across tokens rather than independent, and the damage the
expert does grows with ``S`` times its routing-weight mass ``sum_t w_t`` over calibration tokens. A sensitive
expert the router rarely picks, or picks with a small weight, matters little; a robust one it leans on can still
matter.

Variants compared (``benchmarks/selector_variants.py``, RESULTS.md "Placement beyond the paper"): ``S x frequency``
(traffic counted in tokens) and ``S x sqrt(sum_t w_t^2)`` (errors adding in energy, as if independent per token).
At noise x8, 12.5 % and 25 % digital, 5 instances, on both shared models, this form was the only one of the three
with a lower mean perplexity than both max-neuron-norm and activation frequency in all four cells (each of the
others had the lowest mean in one cell and lost to activation frequency in another); the other two stay out of
the product. The choice was made on those runs.
"""

from __future__ import annotations

from torch import nn

from ..models.calibration import Calibration
from ..models.recognize import ModelInfo
from .base import register_selector
from .max_neuron_norm import score_max_neuron_norm
from .routing_stats import routing_stats


@register_selector(
    "expected-damage",
    True,
    "max-neuron-norm x routing-weight mass over calibration tokens: the damage a noisy expert does to its layer's "
    "output, its per-token sensitivity times the traffic that carries it",
)
def score_expected_damage(model: nn.Module, info: ModelInfo, calibration: Calibration, seed: int = 0):
    sensitivity = score_max_neuron_norm(model, info)
    stats = routing_stats(model, info, calibration)
    return {i: sensitivity[i] * stats[i]["mass"] for i in sensitivity}
