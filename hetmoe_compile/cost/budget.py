"""Placement under a budget: as many of the most sensitive experts digital as a digital-memory or energy budget
allows, chosen greedily by score per unit cost.

An expert's cost is what putting it on digital adds: its weight bytes (memory budget) or its expected extra energy
per token over running it on AIMC (energy budget). With scope ``per-layer`` the candidates come round-robin, each
layer's next best by score/cost per round (the round's best first), so the layers stay balanced; with ``global``
one order over all layers. Each candidate goes digital if the placement still fits, else stays analog; the search
goes on until every candidate was tried. Overrides are applied first and count against the budget.
"""

from __future__ import annotations

import math
from dataclasses import replace

from torch import nn

from ..base.errors import HetMoEError
from ..models.recognize import ModelInfo
from ..placement.placement import (
    ExpertPlacement,
    LayerPlacement,
    Placement,
    _parameter_accounting,
    check_scores,
    model_identity,
    policy_overrides,
)
from ..placement.policy import PlacementPolicy
from ..scoring.base import Scores
from .estimate import Estimator
from .params import CostParams
from .profile import profile_model
from .units import format_budget as _fmt


class _Search:
    """The running total of a budget search: memory adds expert bytes; energy re-evaluates the changed layer."""

    def __init__(self, est: Estimator, kind: str, digital: dict[int, set[int]]) -> None:
        self.est, self.kind, self.digital = est, kind, digital
        self.layer_value = {i: self._layer(i, digital[i]) for i in digital}
        base = est.dense_terms.footprint if kind == "digital_memory" else est.energy(est.dense_terms)
        self.total = base + sum(self.layer_value.values())

    def _layer(self, index: int, digital: set[int]) -> float:
        terms = self.est.layer_terms(index, digital)
        return terms.footprint if self.kind == "digital_memory" else self.est.energy(terms)

    def with_expert(self, index: int, expert: int) -> tuple[float, float]:
        """``(new total, new layer value)`` if ``expert`` of layer ``index`` went digital."""
        value = self._layer(index, self.digital[index] | {expert})
        return self.total - self.layer_value[index] + value, value

    def add(self, index: int, expert: int, total: float, value: float) -> None:
        self.digital[index].add(expert)
        self.layer_value[index], self.total = value, total


def budget_bounds(est: Estimator, kind: str, digital: dict[int, set[int]]) -> tuple[float, float]:
    """``(smallest, all-digital)``: the cost with only ``digital`` (forced) experts digital, and with all of them."""
    low = _Search(est, kind, {i: set(s) for i, s in digital.items()}).total
    everything = {m.index: set(range(m.num_experts)) for m in est.profile.moe}
    return low, _Search(est, kind, everything).total


def place_under_budget(
    model: nn.Module,
    info: ModelInfo,
    scores: Scores,
    policy: PlacementPolicy,
    params: CostParams | None = None,
    *,
    memory_budget: int | None = None,
    energy_budget: float | None = None,
    source: str = "",
    frequencies: dict[int, list[float]] | None = None,
) -> Placement:
    """Place the experts of ``model`` under a digital-memory budget (bytes: dense modules + digital experts) or an
    energy budget (joules per token), given as arguments or in ``policy``; returns the placement with its cost."""
    if memory_budget is not None or energy_budget is not None:
        policy = replace(policy, digital_memory_budget=memory_budget, energy_budget=energy_budget)
    policy.validate()
    if policy.budget is None:
        raise HetMoEError("place_under_budget needs a budget: memory_budget (bytes) or energy_budget (J/token)")
    kind, budget = policy.budget
    params = params or CostParams()
    check_scores(info, scores)
    overrides = policy_overrides(policy, info)
    est = Estimator(profile_model(model, info), params, policy.dense, frequencies)
    forced = {
        m.index: {e for (li, e), d in overrides.items() if li == m.index and d == "digital"} for m in info.moe_layers
    }
    low, high = budget_bounds(est, kind, forced)
    if low > budget:
        what = (
            "the dense modules on digital"
            if policy.dense == "digital"
            else "the digital parts of the dense modules (dense on analog)"
        )
        what += (
            ", the experts forced digital by overrides and no other expert"
            if any(forced.values())
            else " with no expert digital"
        )
        raise HetMoEError(
            f"{kind.replace('_', ' ')} budget {_fmt(kind, budget)} is too small: {what} need "
            f"{_fmt(kind, low)}; all experts digital needs {_fmt(kind, high)}; give a budget of at "
            f"least {_fmt(kind, low)}"
        )
    search = _Search(est, kind, {i: set(s) for i, s in forced.items()})
    candidates = [(m.index, e) for m in info.moe_layers for e in range(m.num_experts) if (m.index, e) not in overrides]
    ratio = {}
    for li, e in candidates:
        cost = search.with_expert(li, e)[0] - search.total
        s = float(scores.layers[li][e])
        ratio[(li, e)] = s / cost if cost > 0 else math.inf
    key = lambda c: (-ratio[c], -float(scores.layers[c[0]][c[1]]), c)  # noqa: E731
    order, rank = _order(candidates, key, policy.scope, info)
    unit = "byte" if kind == "digital_memory" else "energy"
    notes = {}
    for cand in order:
        li, e = cand
        total, value = search.with_expert(li, e)
        where = f"in layer {li}" if policy.scope == "per-layer" else "over all layers"
        head = f"score/{unit} rank {rank[cand][0]}/{rank[cand][1]} {where}"
        if total <= budget:
            search.add(li, e, total, value)
            notes[cand] = f"{head}; fits the {_fmt(kind, budget)} budget"
        else:
            notes[cand] = f"{head}; does not fit the {_fmt(kind, budget)} budget (would need {_fmt(kind, total)})"
    layers = []
    for m in info.moe_layers:
        experts = []
        for e in range(m.num_experts):
            if (m.index, e) in overrides:
                device, reason = overrides[(m.index, e)], f"override {m.index}:{e}={overrides[(m.index, e)]}"
            else:
                device = "digital" if e in search.digital[m.index] else "analog"
                reason = notes[(m.index, e)]
            experts.append(ExpertPlacement(e, float(scores.layers[m.index][e]), device, reason))
        layers.append(LayerPlacement(m.index, m.experts, experts))
    n_digital = sum(len(l.ids("digital")) for l in layers)
    n_total = sum(m.num_experts for m in info.moe_layers)
    policy = replace(policy, digital_fraction=n_digital / n_total)
    dense, share = _parameter_accounting(model, info, layers, policy.dense)
    placement = Placement(model_identity(model, info, source), policy, layers, dense, share)
    budget_note = {"kind": kind, "budget": budget, "used": search.total, "smallest": low, "all_digital": high}
    placement.cost = est.report(placement.devices(), {"budget": budget_note}).to_dict()
    return placement


def _order(candidates, key, scope: str, info: ModelInfo):
    """The search order, and each candidate's ``(rank, of)`` within its layer (per-layer) or over all layers."""
    if scope == "global":
        order = sorted(candidates, key=key)
        return order, {c: (i + 1, len(order)) for i, c in enumerate(order)}
    per_layer = {m.index: sorted([c for c in candidates if c[0] == m.index], key=key) for m in info.moe_layers}
    rank = {c: (i + 1, len(cs)) for cs in per_layer.values() for i, c in enumerate(cs)}
    order = []
    for r in range(max((len(cs) for cs in per_layer.values()), default=0)):
        order += sorted((cs[r] for cs in per_layer.values() if r < len(cs)), key=key)
    return order, rank
