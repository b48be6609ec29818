"""Place the experts of whole-layer expert groups and split each group node into a digital and an analog node.

For Dynamo graphs with one ``hetmoe.expert_group`` node per MoE layer holding all of its experts (made by
:class:`RecognizeExpertsPass` from a raw model, or traced from one prepared with :func:`hetmoe_compile.prepare`):
the pass takes each layer's devices from a given placement (the backend's, made from the whole model by the
composer's placement step) or else scores the graph's weights (``max-neuron-norm`` or ``random``) and ranks them
with the placement policy, and replaces the node by a digital and an analog group whose weights are registered on
the graph module (``hetmoe_groups.L<layer>``). New nodes carry their :class:`NodePlacement`, so
:class:`RewriteAnalogPass` can run next.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import fx, nn

from ...ir.expert_group import GROUP_TENSORS, ExpertGroupCall
from ...placement.placement import Placement, rank_digital
from ...placement.policy import PlacementPolicy, parse_override_key
from ...scoring.max_neuron_norm import max_neuron_norms_canonical
from .pass_base import (
    PLACEMENT_META,
    NodePlacement,
    PassBase,
    PassError,
    PassResult,
    attr_value,
    drop_unused_attrs,
    is_expert_group,
)

SELECTORS = ("max-neuron-norm", "random")
_LAYER = re.compile(r"layers\W*(\d+)")


def evaluate(gm: fx.GraphModule, nodes: Sequence, example_inputs: Sequence) -> list:
    """The concrete values of ``nodes`` computed from the graph's inputs and attributes (weights, not activations:
    only the nodes they depend on run, each once)."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    memo: dict[fx.Node, object] = {}

    def run(n):
        if not isinstance(n, fx.Node):
            return n
        if n in memo:
            return memo[n]
        if n.op == "placeholder":
            value = example_inputs[placeholders[n]]
        elif n.op == "get_attr":
            value = attr_value(gm, str(n.target))
        else:
            args = fx.node.map_aggregate(n.args, run)
            kwargs = fx.node.map_aggregate(n.kwargs, run)
            if n.op == "call_function":
                value = n.target(*args, **kwargs)
            elif n.op == "call_method":
                value = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                value = gm.get_submodule(n.target)(*args, **kwargs)
        memo[n] = value
        return value

    return [run(n) for n in nodes]


def layer_of(node: fx.Node) -> int | None:
    """The decoder layer index from Dynamo's or torch.export's module stack (``...layers[3]...``)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        match = _LAYER.search(str(path))
        if match:
            return int(match.group(1))
    return None


class SplitExpertGroupsPass(PassBase):
    """``call(gm) -> PassResult``: whole-layer expert groups -> placed digital + analog groups."""

    name = "split_expert_groups"

    def __init__(self, policy: PlacementPolicy, example_inputs: Sequence, placement: Placement | None = None) -> None:
        """``placement``: the experts' devices, made from the whole model by the composer's placement step
        (:func:`hetmoe_compile.compose.pipeline.place_model`); without it the pass scores the graph's weights itself."""
        super().__init__()
        self.placement = placement
        if policy.selector not in SELECTORS:
            raise PassError(
                self.name,
                f"selector '{policy.selector}' needs the whole model or calibration text; "
                f"in a graph use one of {', '.join(SELECTORS)} (hetmoe_compile.compile() takes any)",
            )
        self.policy, self.example_inputs = policy, example_inputs
        self.placed: dict[int, dict[int, str]] = {}  # layer -> expert -> device, for reports

    def requires(self, graph_module: fx.GraphModule) -> None:
        for node in graph_module.graph.nodes:
            if is_expert_group(node) and PLACEMENT_META in node.meta:
                raise PassError(
                    self.name,
                    "expert groups are already placed (a canonical model): prepare the "
                    "model with hetmoe_compile.prepare(model) so each layer has one group",
                )

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        groups = [n for n in gm.graph.nodes if is_expert_group(n)]
        layers: dict[int, tuple[fx.Node, dict[str, Any]]] = {}
        values = iter(evaluate(gm, [a for n in groups for a in ExpertGroupCall.of(n).weights()], self.example_inputs))
        for node in groups:
            layer = layer_of(node)
            if layer is None or layer in layers:
                raise PassError(self.name, f"cannot tell the decoder layer of {node.name}")
            keys = ("ids", "gate_up", "down", "gate_up_bias", "down_bias")  # GROUP_TENSORS, ids for expert_ids
            layers[layer] = (node, {k: next(values) for k in keys})
        self._check_overrides({layer: w["ids"].tolist() for layer, (_, w) in layers.items()})
        if self.placement is not None:
            placed = self.placement.devices()
            digital = {(li, e) for li, d in placed.items() for e, dev in d.items() if dev == "digital"}
            notes = {(l.index, x.id): x.reason for l in self.placement.layers for x in l.experts}
        else:
            scores = {layer: self._scores(layer, w) for layer, (_, w) in layers.items()}
            digital, notes = rank_digital(scores, self.policy, self.policy.selector)
        if not hasattr(gm, "hetmoe_groups"):
            gm.add_submodule("hetmoe_groups", nn.Module())
        for layer, (node, w) in layers.items():
            ids = w["ids"].tolist()
            devices = {e: ("digital" if (layer, e) in digital else "analog") for e in ids}
            for key, device in self.policy.overrides.items():
                lay, e = parse_override_key(key)
                if lay == layer and e in devices:
                    devices[e] = device
            self.placed[layer] = devices
            self._split(gm, node, layer, w, devices, notes)
        drop_unused_attrs(gm)  # the replaced weights' get_attr nodes only
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(layers))

    def _check_overrides(self, experts: dict[int, list[int]]) -> None:
        """Overrides name layers of this graph and experts those layers have (never ignored silently)."""
        for key in self.policy.overrides:
            layer, expert = parse_override_key(key)
            if layer not in experts:
                raise PassError(
                    self.name,
                    f"override '{key}' names layer {layer}, but the MoE layers in this graph are {sorted(experts)}",
                )
            if expert not in experts[layer]:
                raise PassError(
                    self.name,
                    f"override '{key}' names expert {expert}, but layer {layer} has experts 0..{max(experts[layer])}",
                )

    def _scores(self, layer: int, w: dict) -> np.ndarray:
        if self.policy.selector == "random":
            return np.random.default_rng([self.policy.seed, layer]).random(w["ids"].numel())
        with torch.no_grad():
            norms = max_neuron_norms_canonical(w["gate_up"], w["down"])
        return (norms["gate"] * norms["up"] * norms["down"]).cpu().numpy()

    def _split(
        self, gm: fx.GraphModule, node: fx.Node, layer: int, w: dict, devices: dict[int, str], notes: dict
    ) -> None:
        ids = w["ids"].tolist()
        holder = nn.Module()
        gm.get_submodule("hetmoe_groups").add_module(f"L{layer}", holder)
        outputs = []
        for device in ("digital", "analog"):
            local = [i for i, e in enumerate(ids) if devices[e] == device]
            if not local:
                continue
            sub = nn.Module()
            index = torch.tensor(local, device=w["ids"].device)
            with torch.no_grad():
                sub.register_buffer("expert_ids", w["ids"].index_select(0, index))
                for k in ("gate_up", "down", "gate_up_bias", "down_bias"):
                    sub.register_buffer(k, None if w[k] is None else w[k].index_select(0, index).contiguous())
            holder.add_module(device, sub)
            prefix = f"hetmoe_groups.L{layer}.{device}"
            with gm.graph.inserting_before(node):
                attrs = [
                    gm.graph.get_attr(f"{prefix}.{k}") if getattr(sub, k) is not None else None
                    for k in ("expert_ids", "gate_up", "down", "gate_up_bias", "down_bias")
                ]
                call = ExpertGroupCall.of(node)._replace(**dict(zip(GROUP_TENSORS, attrs)))
                new = gm.graph.call_function(cast(Callable, node.target), tuple(call))
            chosen = [ids[i] for i in local]
            new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "example_value")})
            new.meta[PLACEMENT_META] = NodePlacement(
                device,
                "routed_experts",
                f"layers.{layer}.experts.groups.{device}",
                f"{device} expert group of layer {layer}: experts {chosen} "
                f"({notes.get((layer, chosen[0]), 'override')}, ...)",
            )
            outputs.append(new)
        with gm.graph.inserting_before(node):
            total = outputs[0] if len(outputs) == 1 else gm.graph.call_function(operator.add, tuple(outputs))
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)
