"""Expected damage: the paper's per-token sensitivity (max neuron norm) times the routed traffic that carries it.

Rationale. The paper's argument is that under weight noise an expert's output error for one token grows with its
largest neuron norms (the product over gate, up and down: ``max-neuron-norm``); it is data-free and says nothing
about how often, or how strongly, the router uses the expert. A layer's output is ``sum_k w_tk * expert_k(x_t)``, so
the error one noisy expert adds to it over the tokens routed to it is ``sum_t w_t * delta(x_t)`` with ``delta``
growing like its max neuron norm ``S``; for independent per-token errors, its expected energy is ``S^2 * sum_t
w_t^2``. Ranking experts by that energy, or by its square root ``S * sqrt(sum_t w_t^2)``, puts the experts whose
noise costs the layer most on digital: a sensitive expert the router rarely picks matters little, a robust one it
leans on can still matter.

Variants compared (``benchmarks/selector_variants.py``, RESULTS.md "Placement beyond the paper"): ``S * frequency``
(traffic counted in tokens) and ``S * sum_t w_t`` (routing-weight mass, errors adding coherently) against this one
(``S * sqrt(sum_t w_t^2)``, errors adding in energy); the other two stay out of the product.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..calibration import Calibration
from ..models.recognize import ModelInfo
from .base import register_selector
from .max_neuron_norm import score_max_neuron_norm


def routed_weight_energy(model: nn.Module, info: ModelInfo, calibration: Calibration) -> dict[int, np.ndarray]:
    """Per layer, ``sum_t w_t^2`` over the calibration tokens routed to each expert (``w_t``: its routing weight)."""
    out = {}
    for index, cap in calibration.routing(model, info).items():
        e = info.layer(index).num_experts
        w = cap.top_k_weights.reshape(-1).double()
        out[index] = torch.zeros(e, dtype=torch.float64).index_add_(0, cap.top_k_index.reshape(-1), w * w).numpy()
    return out


@register_selector(
    "expected-damage",
    True,
    "max-neuron-norm x sqrt(sum of squared routing weights) over calibration tokens: the expert's expected "
    "contribution to its layer's output error under noise",
)
def score_expected_damage(model: nn.Module, info: ModelInfo, calibration: Calibration, seed: int = 0):
    sensitivity = score_max_neuron_norm(model, info)
    energy = routed_weight_energy(model, info, calibration)
    return {i: sensitivity[i] * np.sqrt(energy[i]) for i in sensitivity}
