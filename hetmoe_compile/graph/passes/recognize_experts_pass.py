"""Replace each routed-experts computation of an unprepared model's Dynamo graph by one expert-group node.

Dynamo inlines a family's fused experts module: its parameters reach the graph as inputs, and every node it
traced from the module's forward carries the module in ``node.meta["nn_module_stack"]``. For each such module (one
holding fused ``gate_up_proj`` and ``down_proj`` tensors) the pass takes the nodes traced inside it as one region,
checks that the region reads exactly ``(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])`` besides the
module's own weights and yields one ``[T, H]`` result, and replaces it by a ``hetmoe::expert_group`` call over all
of the layer's experts in canonical layout. The families' fused layout is canonical except GPT-OSS's (transposed,
gate/up interleaved): there the pass registers a canonical copy on the graph module. Routing is untouched, so the
rewritten graph computes the same function; :class:`SplitExpertGroupsPass` can then place it like a prepared one.

The region's module is reached through ``resolve(path)``: the backend resolves Dynamo's module paths
(``L['self'].model.layers.0.mlp.experts``) against the locals of the frame being compiled.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import fx, nn

from ...models.adapter import registered
from ...models.expert_weights import activation_params, canonical_expert_weights
from .pass_base import PassBase, PassError, PassResult, attr_value, drop_unused_attrs, is_expert_group
from .split_expert_groups_pass import layer_of

Resolver = Callable[[str], "nn.Module | None"]
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ROOT = re.compile(r"^L\['(\w+)'\]")
_SPLIT = (
    "a graph break inside the experts (e.g. experts_implementation='eager'), or the experts compiled alone; "
    "compile the whole model with the default 'grouped_mm' experts, or call hetmoe_compile.prepare(model) "
    "before torch.compile"
)
_FUSED_NAME = re.compile(r"(?:\['|_)(?:gate_up_proj|down_proj)(?:'\]|_)$")


def frame_resolver(f_locals: dict) -> Resolver:
    """Resolve Dynamo module paths (``L['self'].model.layers.0.mlp.experts``, ``L['self'].layers[0]``) in the
    locals of the frame Dynamo compiles; ``None`` for a path it cannot follow."""

    def resolve(path: str) -> nn.Module | None:
        match = _ROOT.match(path)
        root = f_locals.get(match.group(1)) if match else None
        if match is None or not isinstance(root, nn.Module):
            return None
        rest = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path[match.end() :]).strip(".")
        try:
            return root.get_submodule(rest) if rest else root
        except AttributeError:
            return None

    return resolve


def _is_fused_experts(module: nn.Module | None) -> bool:
    down = getattr(module, "down_proj", None)
    return (
        isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
    )


def _fused(experts: nn.Module, name: str) -> torch.Tensor:
    """One of the experts module's fused tensors, detached (a view: no copy)."""
    tensor = getattr(experts, name)
    assert isinstance(tensor, torch.Tensor)
    return tensor.detach()


def _value(node: object) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _layout_of(experts: nn.Module):
    config = getattr(experts, "config", None)
    adapter = registered().get(str(getattr(config, "model_type", None)))
    if adapter is None:
        raise PassError(
            RecognizeExpertsPass.name,
            f"experts module {type(experts).__name__} belongs to no supported "
            f"family (model_type {getattr(config, 'model_type', None)!r}); call "
            "hetmoe_compile.prepare(model) before torch.compile",
        )
    return adapter.layout, config


class RecognizeExpertsPass(PassBase):
    """``call(gm) -> PassResult``: inlined fused-experts regions -> ``hetmoe::expert_group`` nodes."""

    name = "recognize_experts"

    def __init__(self, resolve: Resolver) -> None:
        super().__init__()
        self.resolve = resolve
        self.layers: list[int] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        frame_self = self.resolve("L['self']")
        if _is_fused_experts(frame_self):
            raise PassError(
                self.name, f"Dynamo compiles a {type(frame_self).__name__}'s forward as a frame of its own: {_SPLIT}"
            )
        regions: dict[str, list[fx.Node]] = {}
        modules: dict[str, nn.Module | None] = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output") or is_expert_group(node):
                continue
            for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
                if key not in modules:
                    module = self.resolve(str(path))
                    modules[key] = module if _is_fused_experts(module) else None
                if modules[key] is not None:
                    regions.setdefault(key, []).append(node)
                    break
        for key, nodes in regions.items():
            experts = modules[key]
            assert experts is not None
            self._replace(gm, key, experts, nodes)
        self._require_no_loose_experts(gm)
        if regions:
            drop_unused_attrs(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(regions))

    def _replace(self, gm: fx.GraphModule, key: str, experts: nn.Module, nodes: list[fx.Node]) -> None:
        region = set(nodes)
        own = {id(t) for t in experts.parameters(recurse=False)} | {id(t) for t in experts.buffers(recurse=False)}
        inputs: list[fx.Node] = []
        for node in nodes:
            for arg in node.all_input_nodes:
                if (
                    arg in region
                    or arg in inputs
                    or _value(arg) is None  # symbolic sizes are not data
                    or self._is_own(gm, arg, own)
                ):
                    continue
                inputs.append(arg)
        used_outside = [n for n in nodes if any(u not in region for u in n.users)]
        outputs = [n for n in used_outside if _value(n) is not None]
        keep = self._size_nodes([n for n in used_outside if _value(n) is None], region)
        layer = layer_of(nodes[0])
        path = next(iter((nodes[0].meta.get("nn_module_stack") or {}).get(key, (key,))))
        where = f"the experts at {path}" + ("" if layer is None else f" (layer {layer})")
        hidden, index, weights = self._signature(inputs, where)
        out_value = _value(outputs[0]) if len(outputs) == 1 else None
        hidden_value = _value(hidden)
        if (
            out_value is None
            or hidden_value is None
            or out_value.shape != hidden_value.shape
            or any(u.op == "output" for u in outputs[0].users)
        ):
            raise PassError(self.name, f"{where}: the graph holds only part of their computation: {_SPLIT}")
        if layer is None:
            raise PassError(self.name, f"cannot tell the decoder layer of {where}")
        layout, config = _layout_of(experts)
        act_name, alpha, limit = activation_params(config)
        down = _fused(experts, "down_proj")
        num_experts = down.shape[0]
        ids = torch.arange(num_experts, device=down.device)
        if not hasattr(gm, "hetmoe_experts"):
            gm.add_submodule("hetmoe_experts", nn.Module())
        holder = nn.Module()
        holder.register_buffer("expert_ids", ids)
        if layout.transposed or layout.interleaved:  # a canonical copy; the others read the model's own tensors
            w = canonical_expert_weights(experts, layout, ids)
            for name, tensor in zip(("gate_up", "down", "gate_up_bias", "down_bias"), w):
                holder.register_buffer(name, tensor)
        else:
            holder.register_buffer("gate_up", _fused(experts, "gate_up_proj"))
            holder.register_buffer("down", down)
            holder.register_buffer("gate_up_bias", _fused(experts, "gate_up_proj_bias") if layout.has_bias else None)
            holder.register_buffer("down_bias", _fused(experts, "down_proj_bias") if layout.has_bias else None)
        gm.get_submodule("hetmoe_experts").add_module(f"L{layer}", holder)
        prefix = f"hetmoe_experts.L{layer}"
        with gm.graph.inserting_before(outputs[0]):
            attrs = [
                None if getattr(holder, k) is None else gm.graph.get_attr(f"{prefix}.{k}")
                for k in ("expert_ids", "gate_up", "down", "gate_up_bias", "down_bias")
            ]
            new = gm.graph.call_function(
                torch.ops.hetmoe.expert_group.default,
                (hidden, index, weights, *attrs, num_experts, layout.activation, act_name, alpha, limit),
            )
        new.meta["nn_module_stack"] = dict(outputs[0].meta.get("nn_module_stack") or {})
        new.meta["example_value"] = out_value
        outputs[0].replace_all_uses_with(new)
        if keep is None:
            raise PassError(
                self.name,
                f"{where}: a size computed from the experts' tensors is used after them; "
                "call hetmoe_compile.prepare(model) before torch.compile",
            )
        for node in reversed(nodes):
            if node not in keep:
                gm.graph.erase_node(node)
        self.layers.append(layer)

    def _require_no_loose_experts(self, gm: fx.GraphModule) -> None:
        """Fused expert weights still read outside an expert group: their module's computation is split over
        graphs (the experts' own frame after a graph break, where no module path leads to them)."""
        for node in gm.graph.nodes:
            if node.op not in ("placeholder", "get_attr") or not node.users:
                continue
            grapharg = node.meta.get("grapharg")
            name = str(getattr(getattr(grapharg, "source", None), "name", None) or node.target)
            if _FUSED_NAME.search(name) and not all(is_expert_group(u) for u in node.users):
                raise PassError(self.name, f"{name} is read outside an expert group: {_SPLIT}")

    @staticmethod
    def _size_nodes(roots: list[fx.Node], region: set[fx.Node]) -> set[fx.Node] | None:
        """The region's symbolic-size nodes that later code reuses (Dynamo shares ``2*s0``-like expressions), with
        their ancestors in the region: they stay. ``None`` if one of them depends on a tensor of the region."""
        keep: set[fx.Node] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node in keep:
                continue
            if _value(node) is not None:
                return None
            keep.add(node)
            stack.extend(a for a in node.all_input_nodes if a in region)
        return keep

    @staticmethod
    def _is_own(gm: fx.GraphModule, node: fx.Node, own: set[int]) -> bool:
        """A placeholder or attribute holding one of the experts module's own tensors."""
        if node.op == "placeholder":
            grapharg = node.meta.get("grapharg")
            example = getattr(grapharg, "example", None) if grapharg is not None else None
            return example is not None and id(example) in own
        if node.op == "get_attr":
            return id(attr_value(gm, str(node.target))) in own
        return False

    def _signature(self, inputs: list[fx.Node], where: str) -> tuple[fx.Node, fx.Node, fx.Node]:
        """``(hidden, top_k_index, top_k_weights)`` among the region's inputs, told apart by dtype and shape."""
        values = [(n, v) for n in inputs if (v := _value(n)) is not None and v.dim() == 2]
        ints = [(n, v) for n, v in values if not v.is_floating_point()]
        floats = [(n, v) for n, v in values if v.dtype in _FLOAT]
        if len(inputs) == 3 and len(ints) == 1 and len(floats) == 2:
            k = ints[0][1].shape[-1]
            weights = [n for n, v in floats if v.shape[-1] == k]
            hidden = [n for n, v in floats if v.shape[-1] != k]
            if len(weights) == 1 and len(hidden) == 1:
                return hidden[0], ints[0][0], weights[0]
        raise PassError(
            self.name,
            f"{where}: expected the experts to read (hidden [T, H], top_k_index [T, K], "
            f"top_k_weights [T, K]) besides their weights, found {[n.name for n in inputs]}; call "
            "hetmoe_compile.prepare(model) before torch.compile",
        )
