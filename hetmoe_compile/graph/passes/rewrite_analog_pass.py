"""Replace analog-tagged ``hetmoe.expert_group`` nodes by ``hetmoe.analog_expert_group`` (one hardware instance).

Runs on a graph whose weights are reachable as attributes (``get_attr``): an exported program's ``.module()``
or a Dynamo graph. The programmed weights are registered on the graph module under ``hetmoe_analog.L<layer>``,
in the weights' dtype (with their calibrated input ranges under constant noise management), programmed a few
experts at a time (:class:`~hetmoe_compile.analog.programmed_stack.
ProgrammedStack`); digital nodes are left untouched. Requires :class:`AnnotatePlacementPass` tags.

Memory: by default (``in_place=False``) the ideal weights belong to the caller and stay as they are, so the
programmed copy is a second one. With ``in_place=True`` (the ``torch.compile`` backend, whose split pass made its
own copies) the programmed tiles take over the ideal weights' storage, which the graph module then drops: one
copy of the analog weights on the device.
"""

from __future__ import annotations

import re

import torch
from torch import fx, nn

from ...analog import expert_group_op as _analog_op  # noqa: F401 (registers hetmoe::analog_expert_group)
from ...analog.config import AnalogConfig
from ...analog.input_ranges import NO_RANGES, InputRanges
from ...analog.instance import MATRICES, output_noise_seed, program_expert_stacks
from ...analog.programmed_stack import ProgrammedStack
from ...analog.tiles import Periphery
from ...ir.expert_group import SETTINGS, ExpertGroupCall
from .pass_base import PLACEMENT_META, PassBase, PassError, PassResult, attr_value, drop_unused_attrs, is_expert_group

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _attr(gm: fx.GraphModule, node) -> torch.Tensor:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise PassError(
            RewriteAnalogPass.name,
            f"expected weights as get_attr nodes, got {node}; rewrite "
            "ep.module() (unlifted) rather than ep.graph_module",
        )
    return attr_value(gm, str(node.target))


def _drop_attr(gm: fx.GraphModule, target: str) -> None:
    """Forget the attribute ``target`` (its storage now holds programmed tiles, or was replaced)."""
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if attr in owner._buffers:
        owner._buffers[attr] = None
    elif attr in owner._parameters:
        owner._parameters[attr] = None
    else:
        setattr(owner, attr, None)


class RewriteAnalogPass(PassBase):
    """``call(gm) -> PassResult``: analog expert groups -> AIMC op with weights programmed for ``seed``."""

    name = "rewrite_analog"

    def __init__(
        self, cfg: AnalogConfig, seed: int = 0, in_place: bool = False, input_ranges: InputRanges | None = None
    ) -> None:
        super().__init__()
        self.cfg, self.seed, self.in_place, self.input_ranges = cfg, seed, in_place, input_ranges

    def requires(self, graph_module: fx.GraphModule) -> None:
        nodes = [n for n in graph_module.graph.nodes if is_expert_group(n)]
        if any(PLACEMENT_META not in n.meta for n in nodes):
            raise PassError(self.name, "expert-group nodes carry no placement; run annotate_placement first")
        if self.cfg.noise_management == "constant" and self.input_ranges is None:
            raise PassError(self.name, NO_RANGES)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        if not hasattr(gm, "hetmoe_analog"):
            gm.add_submodule("hetmoe_analog", nn.Module())
        modified = False
        programmed_over: list[str] = []
        for node in list(gm.graph.nodes):
            if not is_expert_group(node) or node.meta[PLACEMENT_META].device != "analog":
                continue
            tag = node.meta[PLACEMENT_META]
            match = _LAYER.search(tag.module + ".")
            if match is None:
                raise PassError(self.name, f"cannot tell the decoder layer of {node.name} ({tag.module})")
            layer = int(match.group(1))
            call = ExpertGroupCall.of(node)
            hidden, idx, weights = call.hidden, call.top_k_index, call.top_k_weights
            ids_n, gu_n, down_n, gub_n, db_n = call.weights()
            num_experts, activation, act_name, alpha, limit = (getattr(call, k) for k in SETTINGS)
            ids, gate_up, down = _attr(gm, ids_n), _attr(gm, gu_n), _attr(gm, down_n)
            holder = nn.Module()
            holder.register_buffer("rng_state", torch.full((1,), output_noise_seed(self.seed, layer)))
            stacks = [
                ProgrammedStack(t, self.cfg.tile_size, "discard" if self.in_place else "copy", name=key)
                for key, t in zip(MATRICES, (gate_up, down))
            ]
            program_expert_stacks(stacks, self.cfg, self.seed, layer, ids.tolist())
            for key, stack, tensor_node in zip(MATRICES, stacks, (gu_n, down_n)):
                holder.register_buffer(f"{key}_weight", stack.weight)
                holder.register_buffer(f"{key}_scale", stack.scale)
                if self.in_place:
                    programmed_over.append(str(tensor_node.target))
            names = ["gate_up_weight", "gate_up_scale", "down_weight", "down_scale", "rng_state"]
            if self.cfg.noise_management == "constant":
                assert self.input_ranges is not None  # checked in requires()
                self.input_ranges.check_widths(layer, gate_up.shape[-1], down.shape[-1])
                ranges = self.input_ranges.for_experts(layer, ids.tolist(), self.cfg.tile_size)
                for key, r in zip(("gate_up_range", "down_range"), ranges):
                    holder.register_buffer(key, r.to(gate_up.device))
                    names.append(key)
            gm.get_submodule("hetmoe_analog").add_module(f"L{layer}", holder)
            prefix = f"hetmoe_analog.L{layer}"
            with gm.graph.inserting_before(node):
                get = {k: gm.graph.get_attr(f"{prefix}.{k}") for k in names}
                new = gm.graph.call_function(
                    torch.ops.hetmoe.analog_expert_group.default,
                    (
                        hidden,
                        idx,
                        weights,
                        ids_n,
                        get["gate_up_weight"],
                        get["gate_up_scale"],
                        get["down_weight"],
                        get["down_scale"],
                        gub_n,
                        db_n,
                        get["rng_state"],
                        num_experts,
                        activation,
                        act_name,
                        alpha,
                        limit,
                        list(Periphery.of(self.cfg)),
                        get.get("gate_up_range"),
                        get.get("down_range"),
                    ),
                )
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            new.meta[PLACEMENT_META] = tag._replace(reason=tag.reason + f"; AIMC {self.cfg.preset}, seed {self.seed}")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        drop_unused_attrs(gm)  # the replaced weights' get_attr nodes only
        used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for target in programmed_over:  # their storage holds programmed tiles now
            if target not in used:
                _drop_attr(gm, target)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)
