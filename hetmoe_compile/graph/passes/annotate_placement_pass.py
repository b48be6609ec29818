"""Tag every FX node with its placement (``node.meta["hetmoe_placement"]``) and the reason.

Partitioning only tags: the graph is not edited. Expert-group nodes take their group's device; nodes of dense
modules (attention, routers, shared experts, embeddings, norms, LM head, dense MLPs) take the policy's dense
device; glue without a module (reshapes, the sum of expert groups, inputs and outputs) stays digital.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import fx

from ...models.recognize import DENSE_KINDS, ModelInfo
from ...placement.placement import Placement
from .pass_base import PLACEMENT_META, NodePlacement, PassBase, PassError, PassResult, is_expert_group

_GROUP = re.compile(r"^(?P<experts>.*)\.groups\.(?P<device>digital|analog)(\.|$)")


class AnnotatePlacementPass(PassBase):
    """``call(gm) -> PassResult``; requires expert-group nodes, ensures every node carries a NodePlacement.

    ``param_fqns`` maps placeholder names to parameter/buffer FQNs (``torch.export``'s graph signature);
    ``root_prefix`` is stripped from module paths (``"model."`` for :func:`export_model` graphs).
    """

    name = "annotate_placement"

    def __init__(
        self,
        placement: Placement,
        info: ModelInfo,
        param_fqns: Mapping[str, str] | None = None,
        root_prefix: str = "model.",
    ) -> None:
        super().__init__()
        self.placement = placement
        self.info = info
        self.param_fqns = dict(param_fqns or {})
        self.root_prefix = root_prefix
        self.layer_of_experts = {l.experts: l.index for l in info.moe_layers}

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not any(is_expert_group(n) for n in graph_module.graph.nodes):
            raise PassError(self.name, "graph has no hetmoe.expert_group node; canonicalize the model before capture")

    def ensures(self, graph_module: fx.GraphModule) -> None:
        missing = [n.name for n in graph_module.graph.nodes if PLACEMENT_META not in n.meta]
        if missing:
            raise PassError(self.name, f"{len(missing)} node(s) left untagged, e.g. {missing[:3]}")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        for node in graph_module.graph.nodes:
            node.meta[PLACEMENT_META] = self.classify(node)
        return PassResult(graph_module, True)

    def _strip(self, path: str) -> str:
        return path[len(self.root_prefix) :] if self.root_prefix and path.startswith(self.root_prefix) else path

    def _module_of(self, node: fx.Node) -> str | None:
        if node.op == "placeholder" and node.name in self.param_fqns:
            fqn = self._strip(self.param_fqns[node.name])
            return fqn.rsplit(".", 1)[0] if "." in fqn else ""
        if node.op == "get_attr":
            target = self._strip(str(node.target))
            return target.rsplit(".", 1)[0] if "." in target else ""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        return self._strip(path)

    def classify(self, node: fx.Node) -> NodePlacement:
        module = self._module_of(node)
        if module is None:
            what = "graph input/output" if node.op in ("placeholder", "output") else "glue op outside any module"
            return NodePlacement("digital", "io" if node.op in ("placeholder", "output") else "other", "", what)
        group = _GROUP.match(module)
        if group:
            device, layer = group["device"], self.layer_of_experts.get(group["experts"])
            ids = next((l.ids(device) for l in self.placement.layers if l.index == layer), [])
            if is_expert_group(node):
                reason = f"{device} expert group of layer {layer}: experts {ids}"
            else:
                reason = f"weights of the {device} expert group of layer {layer}"
            return NodePlacement(device, "routed_experts", group.group(0).rstrip("."), reason)
        kind = self.info.kind_of(module)
        if kind == "routed_experts":
            return NodePlacement("digital", kind, module, "sum of the expert groups' outputs (digital accumulation)")
        if kind in DENSE_KINDS and kind != "other":
            device = self.placement.policy.dense
            return NodePlacement(device, kind, module, f"dense module ({kind}): {device} by policy")
        return NodePlacement("digital", kind, module, "not a routed expert; digital")
