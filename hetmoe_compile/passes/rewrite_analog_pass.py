"""Replace analog-tagged ``hetmoe.expert_group`` nodes by ``hetmoe.analog_expert_group`` (one hardware instance).

Runs on a graph whose weights are reachable as attributes (``get_attr``): an exported program's ``.module()``
or a Dynamo graph. The programmed weights are registered on the graph module under ``hetmoe_analog.L<layer>``;
digital nodes are left untouched. Requires :class:`AnnotatePlacementPass` tags.
"""
from __future__ import annotations

import re

import torch
from torch import fx, nn

from ..analog.config import AnalogConfig
from ..analog.expert_group_op import program_group
from ..analog.programming_noise import OUT_NOISE_STREAM, stream_seed
from ..analog.tiles import Periphery
from .pass_base import PLACEMENT_META, PassBase, PassError, PassResult, is_expert_group

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise PassError(RewriteAnalogPass.name, f"expected weights as get_attr nodes, got {node}; rewrite "
                        "ep.module() (unlifted) rather than ep.graph_module")
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


class RewriteAnalogPass(PassBase):
    """``call(gm) -> PassResult``: analog expert groups -> AIMC op with weights programmed for ``seed``."""

    name = "rewrite_analog"

    def __init__(self, cfg: AnalogConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed

    def requires(self, graph_module: fx.GraphModule) -> None:
        nodes = [n for n in graph_module.graph.nodes if is_expert_group(n)]
        if any(PLACEMENT_META not in n.meta for n in nodes):
            raise PassError(self.name, "expert-group nodes carry no placement; run annotate_placement first")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        if not hasattr(gm, "hetmoe_analog"):
            gm.add_submodule("hetmoe_analog", nn.Module())
        store = gm.hetmoe_analog
        modified = False
        for node in list(gm.graph.nodes):
            if not is_expert_group(node) or node.meta[PLACEMENT_META].device != "analog":
                continue
            tag = node.meta[PLACEMENT_META]
            match = _LAYER.search(tag.module + ".")
            if match is None:
                raise PassError(self.name, f"cannot tell the decoder layer of {node.name} ({tag.module})")
            layer = int(match.group(1))
            (hidden, idx, weights, ids_n, gu_n, down_n, gub_n, db_n, num_experts, activation, act_name, alpha,
             limit) = node.args
            ids, gate_up, down = _attr(gm, ids_n), _attr(gm, gu_n), _attr(gm, down_n)
            holder = nn.Module()
            holder.register_buffer("rng_state", torch.full((1,), stream_seed(self.seed, layer, OUT_NOISE_STREAM)))
            for key, value in program_group(gate_up, down, ids, self.cfg, self.seed, layer).items():
                holder.register_buffer(key, value)
            store.add_module(f"L{layer}", holder)
            prefix = f"hetmoe_analog.L{layer}"
            with gm.graph.inserting_before(node):
                get = {k: gm.graph.get_attr(f"{prefix}.{k}") for k in
                       ("gate_up_weight", "gate_up_scale", "down_weight", "down_scale", "rng_state")}
                new = gm.graph.call_function(
                    torch.ops.hetmoe.analog_expert_group.default,
                    (hidden, idx, weights, ids_n, get["gate_up_weight"], get["gate_up_scale"], get["down_weight"],
                     get["down_scale"], gub_n, db_n, get["rng_state"], num_experts, activation, act_name, alpha,
                     limit, list(Periphery.of(self.cfg))),
                )
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            new.meta[PLACEMENT_META] = tag._replace(reason=tag.reason + f"; AIMC {self.cfg.preset}, seed {self.seed}")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        gm.graph.eliminate_dead_code()  # the ideal weights' get_attr nodes
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)
