"""Compute a placement (each routed expert and dense module -> digital | analog, with the reason) and its JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
from torch import nn

from ..base.errors import HetMoEError
from ..base.io import atomic_write_text, finite_json, read_json_file
from ..base.version import PRODUCER
from ..models.identity import config_hash, model_identity
from ..models.recognize import ROUTED_EXPERTS, ModelInfo
from ..scoring.base import Scores
from .policy import PlacementPolicy, parse_override_key
from .schema import SCHEMA_VERSION, check_coverage, validate_placement


@dataclass
class ExpertPlacement:
    id: int
    score: float
    device: str
    reason: str


@dataclass
class LayerPlacement:
    index: int
    module: str
    experts: list[ExpertPlacement]

    def ids(self, device: str) -> list[int]:
        return [e.id for e in self.experts if e.device == device]


@dataclass
class DensePlacement:
    module: str
    kind: str
    device: str
    params: int


@dataclass
class Placement:
    """A complete placement; ``to_dict`` gives the ``placement.json`` document."""

    model: dict
    policy: PlacementPolicy
    layers: list[LayerPlacement]
    dense_modules: list[DensePlacement]
    parameter_share: dict[str, dict]
    producer: str = PRODUCER
    schema_version: str = SCHEMA_VERSION
    cost: dict | None = None
    """The cost-model estimate (:meth:`hetmoe_compile.cost.CostReport.to_dict`), when one was made."""

    def devices(self) -> dict[int, dict[int, str]]:
        """Decoder layer index -> expert id -> device (the input of :func:`canonicalize`)."""
        return {l.index: {e.id: e.device for e in l.experts} for l in self.layers}

    def dense_device(self, kind: str) -> str:
        for d in self.dense_modules:
            if d.kind == kind:
                return d.device
        return self.policy.dense

    def to_dict(self) -> dict:
        doc = {
            "schema_version": self.schema_version,
            "producer": self.producer,
            "model": self.model,
            "policy": self.policy.to_dict(),
            "layers": [asdict(l) for l in self.layers],
            "dense_modules": [asdict(d) for d in self.dense_modules],
            "parameter_share": self.parameter_share,
        }
        if self.cost is not None:
            doc["cost"] = self.cost
        return doc

    @classmethod
    def from_dict(cls, data: dict, source: str = "<placement>") -> Placement:
        validate_placement(data, source)
        return cls(
            model=data["model"],
            policy=PlacementPolicy.from_dict(data["policy"]),
            layers=[
                LayerPlacement(l["index"], l["module"], [ExpertPlacement(**e) for e in l["experts"]])
                for l in data["layers"]
            ],
            dense_modules=[DensePlacement(**d) for d in data["dense_modules"]],
            parameter_share=data["parameter_share"],
            producer=data["producer"],
            schema_version=data["schema_version"],
            cost=data.get("cost"),
        )

    def save(self, path: str | Path) -> Path:
        """Validate and write atomically (a temp file renamed into place)."""
        doc = self.to_dict()
        validate_placement(doc, str(path))
        return atomic_write_text(Path(path), finite_json(doc, str(path)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        path = Path(path)
        data = read_json_file(path, f"{path}: placement file not found; create one with 'hetmoe-compile place'")
        return cls.from_dict(cast(dict, data), str(path))  # from_dict validates it against the schema


def _n_digital(fraction: float, n: int) -> int:
    return min(n, math.ceil(fraction * n - 1e-9))


def rank_digital(
    scores: dict[int, np.ndarray], policy: PlacementPolicy, selector: str
) -> tuple[set[tuple[int, int]], dict[tuple[int, int], str]]:
    """The ``(layer, expert)`` pairs on digital by ``policy`` (top fraction per layer, or over all layers), and a
    note per expert saying its rank. Ties go to the lower expert id."""
    digital: set[tuple[int, int]] = set()
    notes: dict[tuple[int, int], str] = {}
    if policy.scope == "per-layer":
        for layer, values in scores.items():
            s = np.asarray(values, dtype=float)
            order = sorted(range(len(s)), key=lambda e: (-s[e], e))
            k = _n_digital(policy.digital_fraction, len(s))
            for rank, e in enumerate(order):
                if rank < k:
                    digital.add((layer, e))
                notes[(layer, e)] = f"rank {rank + 1}/{len(s)} by {selector} in layer {layer} (top {k} digital)"
    else:
        keys = [(layer, e) for layer, values in scores.items() for e in range(len(values))]
        ranked = sorted(keys, key=lambda key: (-float(scores[key[0]][key[1]]), key))
        k = _n_digital(policy.digital_fraction, len(keys))
        for rank, key in enumerate(ranked):
            if rank < k:
                digital.add(key)
            notes[key] = f"rank {rank + 1}/{len(keys)} by {selector} over all layers (top {k} digital)"
    return digital, notes


def check_scores(info: ModelInfo, scores: Scores) -> None:
    """Every MoE layer has one finite score per expert."""
    for layer in info.moe_layers:
        got = scores.layers.get(layer.index)
        if got is None or len(got) != layer.num_experts:
            raise HetMoEError(f"scores from '{scores.selector}' do not cover layer {layer.index}'s experts")
        bad = [e for e, v in enumerate(np.asarray(got, dtype=np.float64)) if not np.isfinite(v)]
        if bad:
            raise HetMoEError(
                f"scores from '{scores.selector}' are not finite numbers for layer {layer.index}'s experts {bad} "
                "(NaN weights, or a selector that divides by zero), so they rank nothing; check the model's weights "
                "or choose another selector"
            )


def policy_overrides(policy: PlacementPolicy, info: ModelInfo) -> dict[tuple[int, int], str]:
    """``(layer, expert) -> device`` of the policy's overrides, checked against the model."""
    overrides = {parse_override_key(k): v for k, v in policy.overrides.items()}
    for li, e in overrides:
        if li not in {l.index for l in info.moe_layers} or not 0 <= e < info.layer(li).num_experts:
            raise HetMoEError(
                f"override {li}:{e}: no such MoE layer/expert; MoE layers are "
                f"{[l.index for l in info.moe_layers]} with {info.moe_layers[0].num_experts} experts"
            )
    return overrides


def place(model: nn.Module, info: ModelInfo, scores: Scores, policy: PlacementPolicy, source: str = "") -> Placement:
    """Rank experts by ``scores`` and put the top ``digital_fraction`` (per layer or globally) on digital. A policy
    with a budget is placed by the cost model (:func:`hetmoe_compile.compose.pipeline.place_scores` dispatches)."""
    policy.validate()
    if policy.budget is not None:
        raise HetMoEError(
            "a budget policy is placed by the cost model: use hetmoe_compile.compose.pipeline.place_scores "
            "(or hetmoe_compile.compile), which costs it with the cost parameters and routing"
        )
    check_scores(info, scores)
    digital, rank_note = rank_digital(
        {l.index: scores.layers[l.index] for l in info.moe_layers}, policy, scores.selector
    )
    overrides = policy_overrides(policy, info)
    layers = []
    for layer in info.moe_layers:
        experts = []
        for e in range(layer.num_experts):
            key = (layer.index, e)
            if key in overrides:
                device, reason = overrides[key], f"override {layer.index}:{e}={overrides[key]}"
            else:
                device = "digital" if key in digital else "analog"
                reason = rank_note[key]
            experts.append(ExpertPlacement(e, float(scores.layers[layer.index][e]), device, reason))
        layers.append(LayerPlacement(layer.index, layer.experts, experts))
    dense, share = _parameter_accounting(model, info, layers, policy.dense)
    return Placement(model_identity(model, info, source), policy, layers, dense, share)


def _parameter_accounting(model: nn.Module, info: ModelInfo, layers: list[LayerPlacement], dense_device: str):
    per_module: dict[str, int] = {}
    expert_params: dict[str, int] = {}
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0] if "." in name else ""
        owner = info.owner_of(module)
        if info.module_kinds.get(owner) == ROUTED_EXPERTS:
            expert_params[owner] = expert_params.get(owner, 0) + p.numel()
        else:
            per_module[owner] = per_module.get(owner, 0) + p.numel()
    dense = [DensePlacement(m, info.kind_of(m), dense_device, n) for m, n in per_module.items()]
    totals = {"digital": 0, "analog": 0}
    for d in dense:
        totals[d.device] += d.params
    for layer in layers:
        per_expert = expert_params[layer.module] // len(layer.experts)
        for e in layer.experts:
            totals[e.device] += per_expert
    total = sum(totals.values())
    share = {dev: {"params": n, "share": n / total if total else 0.0} for dev, n in totals.items()}
    return dense, share


def check_placement_matches(placement: Placement, model: nn.Module, info: ModelInfo, source: str) -> None:
    """A placement made for another model, or one that does not place each of the model's experts exactly once,
    is an error, not a silent mismatch."""
    if placement.model.get("config_sha256") not in (config_hash(model), config_hash(model, legacy=True)):
        raise HetMoEError(
            f"{source}: placement was made for another model ({placement.model.get('source')}, "
            "config hash differs); re-run 'hetmoe-compile place' for this model"
        )
    check_coverage(
        [(layer.index, [e.id for e in layer.experts]) for layer in placement.layers],
        [layer.index for layer in info.moe_layers],
        {layer.index: layer.num_experts for layer in info.moe_layers},
        source,
    )
    check_derived_fields(placement, model, info, source)


def check_derived_fields(placement: Placement, model: nn.Module, info: ModelInfo, source: str) -> None:
    """The fields of a placement that describe the model or follow from its devices must say what the model and
    the devices say: the model's facts, each layer's module path, and the dense modules and parameter shares
    (derived from the policy's dense device). An edited field is refused, never believed."""
    fix = "re-run 'hetmoe-compile place' (or hetmoe_compile.place) for this model"
    facts = model_identity(model, info, "")
    for key, value in facts.items():
        if key not in ("source", "config_sha256") and key in placement.model and placement.model[key] != value:
            raise HetMoEError(
                f"{source}: model.{key} says {placement.model[key]!r}, the model has {value!r} (edited?); {fix}"
            )
    for layer in placement.layers:
        want = info.layer(layer.index).experts
        if layer.module != want:
            raise HetMoEError(
                f"{source}: layer {layer.index}'s module is {layer.module!r}, the model's is {want!r}; {fix}"
            )
    dense, share = _parameter_accounting(model, info, placement.layers, placement.policy.dense)
    recorded = {(d.module, d.kind, d.device, d.params) for d in placement.dense_modules}
    derived = {(d.module, d.kind, d.device, d.params) for d in dense}
    if recorded != derived:
        first = sorted(recorded ^ derived)[0]
        raise HetMoEError(
            f"{source}: dense_modules disagree with the model and policy.dense={placement.policy.dense!r} (e.g. "
            f"{first[0] or '(root)'} on {first[2]}); {fix}"
        )
    if placement.parameter_share != json.loads(json.dumps(share)):
        raise HetMoEError(f"{source}: parameter_share disagrees with the experts' devices (edited?); {fix}")
