"""Cut a placeholder graph into per-device partitions and an execution schedule.

Every digital expert-group placeholder is replaced by its standard-op body. Each analog placeholder becomes a
partition of its own, ``(hidden_states, top_k_index, top_k_weights) -> partial_output``. The remaining nodes are
split by *stage*, the number of analog groups upstream of a node: digital stage ``d`` runs after the analog groups
of stage ``d - 1`` and before those of stage ``d``, so the schedule is ``D0, A0, D1, A1, ..., Dn`` for a chain of
MoE layers. Tensors crossing a cut become partition outputs and inputs; ``Constant`` nodes and initializers are
copied into every partition that uses them.
"""
from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, ValueInfoProto, helper

from .expert_group_onnx import Activation, ExpertArrays, ProgrammedExpert, TilePeriphery, expert_group_body
from .graph_builder import GraphBuilder
from .onnx_capture import DOMAIN, PLACEHOLDER
from .tensor_store import TensorStore

ANALOG_INPUTS = ("hidden_states", "top_k_index", "top_k_weights")
ANALOG_OUTPUT = "partial_output"


@dataclass
class GroupNode:
    """One expert-group placeholder of the captured graph."""

    node: NodeProto
    layer: int
    device: str
    expert_ids: list[int]
    act: Activation

    def experts(self, store: TensorStore) -> list[ExpertArrays]:
        """Lazy per-expert weights read from the group's stacked initializers."""
        names = list(self.node.input)
        bias = len(names) > 6 and names[6]
        return [ExpertArrays(e, store.ref(names[4], i), store.ref(names[5], i),
                             store.ref(names[6], i) if bias else None,
                             store.ref(names[7], i) if bias else None)
                for i, e in enumerate(self.expert_ids)]


@dataclass
class Partition:
    """One ONNX model of the export and its place in the schedule."""

    name: str
    device: str
    nodes: list[NodeProto]
    initializers: dict[str, object]
    inputs: list[str]
    outputs: list[str]
    bindings: dict[str, str]  # local tensor name -> model-level tensor name
    types: dict[str, ValueInfoProto]  # local name -> type and shape
    layer: int | None = None
    expert_ids: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts computed here
    source_modules: list[str] = field(default_factory=list)


def find_groups(model: ModelProto, store: TensorStore, group_of: dict[str, tuple[int, str]]) -> list[GroupNode]:
    """The placeholders, resolved to ``(layer, device)`` by their ``gate_up`` initializer's name."""
    out = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != PLACEHOLDER:
            continue
        if node.input[4] not in group_of:
            raise ValueError(f"expert group with weights '{node.input[4]}' is not in the placement")
        layer, device = group_of[node.input[4]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        act = Activation(_str(attrs.get("activation", "glu")), _str(attrs.get("act_name", "silu")),
                         float(attrs.get("alpha", 0.0)), float(attrs.get("limit", 0.0)))
        ids = [int(i) for i in store.load(node.input[3]).reshape(-1)]
        out.append(GroupNode(node, layer, device, ids, act))
    return out


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def inline_group(group: GroupNode, store: TensorStore, dtype: np.dtype,
                 programmed: list[ProgrammedExpert] | None = None, periphery: TilePeriphery | None = None,
                 inputs: list[str] | None = None, output: str | None = None) -> GraphBuilder:
    """The standard-op body of ``group`` (on the placeholder's tensors unless ``inputs``/``output`` are given)."""
    b = GraphBuilder(f"hetmoe/L{group.layer}/{group.device}/")
    hidden, index, weights = inputs or list(group.node.input[:3])
    expert_group_body(b, hidden, index, weights, output or group.node.output[0], group.experts(store), group.act,
                      dtype, programmed, periphery, group.layer)
    return b


def value_types(model: ModelProto) -> dict[str, ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


def _node_inputs(node: NodeProto) -> list[str]:
    """Inputs of ``node`` including outer-scope names its subgraphs read."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            names += _outer_names(sub)
    return names


def _outer_names(g: GraphProto) -> list[str]:
    local = {i.name for i in g.input} | {t.name for t in g.initializer}
    out = []
    for node in g.node:
        out += [n for n in _node_inputs(node) if n not in local]
        local.update(node.output)
    return out


def _module_of(node: NodeProto, root_prefix: str) -> str | None:
    """The deepest module path recorded by the exporter for ``node`` (root prefix removed)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            mods = [s for s in scopes[:-1] if s.startswith(root_prefix)]
            return mods[-1][len(root_prefix):] if mods else None
    return None


def partition_graph(model: ModelProto, store: TensorStore, groups: list[GroupNode], dtype: np.dtype,
                    root_prefix: str, monolithic: bool = False) -> list[Partition]:
    """Split ``model`` into the scheduled partitions (``monolithic``: one partition, analog groups inlined ideal).

    Analog partitions are returned with their ideal body; :func:`analog_partition` builds instance variants."""
    by_node = {id(g.node): g for g in groups}
    types = value_types(model)
    init = {t.name for t in model.graph.initializer}
    constants: dict[str, NodeProto] = {}
    stage: dict[str, int] = {}
    digital: dict[int, list[NodeProto]] = {}
    body_inits: dict[int, dict[str, object]] = {}
    modules: dict[int, list[str]] = {}
    layer_experts: dict[int, dict[int, list[int]]] = {}
    analog: list[tuple[int, GroupNode]] = []
    for node in model.graph.node:
        if node.op_type == "Constant" and not node.input:
            for o in node.output:
                constants[o] = node
            continue
        s = max((stage.get(n, 0) for n in _node_inputs(node)), default=0)
        group = by_node.get(id(node))
        if group is not None and group.device == "analog" and not monolithic:
            analog.append((s, group))
            stage[node.output[0]] = s + 1
            continue
        for o in node.output:
            stage[o] = s
        mod = _module_of(node, root_prefix)
        if mod and mod not in modules.setdefault(s, []):
            modules[s].append(mod)
        del node.metadata_props[:]  # the exporter's stack traces; the manifest keeps the module paths
        if group is not None:
            b = inline_group(group, store, dtype)
            digital.setdefault(s, []).extend(b.nodes)
            body_inits.setdefault(s, {}).update(b.initializers)
            layer_experts.setdefault(s, {}).setdefault(group.layer, []).extend(group.expert_ids)
        else:
            digital.setdefault(s, []).append(node)

    graph_inputs = [i.name for i in model.graph.input]
    graph_outputs = [o.name for o in model.graph.output]
    # Who consumes what: digital stages, analog groups (by their inputs), and the graph outputs.
    consumers: dict[str, set[str]] = {}
    parts_order: list[tuple[str, object]] = []
    stages = sorted(set(digital) | {s for s, _ in analog} | {s + 1 for s, _ in analog})
    for s in stages:
        if s in digital:
            parts_order.append(("digital", s))
        parts_order += [("analog", g) for st, g in analog if st == s]
    def name_of(kind: str, key) -> str:
        if kind == "analog":
            return f"analog_L{key.layer}"
        return "model" if monolithic else f"digital_{key}"

    for kind, key in parts_order:
        name = name_of(kind, key)
        used = ([n for node in digital[key] for n in _node_inputs(node)] if kind == "digital"
                else list(key.node.input[:3]))
        for n in used:
            consumers.setdefault(n, set()).add(name)
    for n in graph_outputs:
        consumers.setdefault(n, set()).add("<output>")

    parts: list[Partition] = []
    for kind, key in parts_order:
        if kind == "analog":
            parts.append(analog_partition(key, store, dtype, types))
            continue
        name = name_of(kind, key)
        nodes = digital[key]
        produced = {o for node in nodes for o in node.output}
        needed, inits, const_nodes = [], {}, []
        for node in nodes:
            for n in _node_inputs(node):
                if n in produced or n in needed:
                    continue
                if n in init:
                    inits[n] = store.ref(n)
                elif n in constants:
                    if constants[n] not in const_nodes:
                        const_nodes.append(constants[n])
                elif n in body_inits.get(key, {}):
                    inits[n] = body_inits[key][n]
                else:
                    needed.append(n)
        outputs = [n for n in _ordered(nodes) if n in produced and consumers.get(n, set()) - {name}]
        ins = [n for n in graph_inputs if n in needed] + [n for n in needed if n not in graph_inputs]
        parts.append(Partition(name, "digital", const_nodes + nodes, inits, ins, outputs,
                               {n: n for n in ins + outputs}, {n: types[n] for n in ins + outputs if n in types},
                               expert_ids=layer_experts.get(key, {}), source_modules=modules.get(key, [])))
    return parts


def _ordered(nodes: list[NodeProto]) -> list[str]:
    return [o for node in nodes for o in node.output if o]


def analog_partition(group: GroupNode, store: TensorStore, dtype: np.dtype, types: dict[str, ValueInfoProto],
                     programmed: list[ProgrammedExpert] | None = None,
                     periphery: TilePeriphery | None = None) -> Partition:
    """The partition of one analog group: ideal weights, or one programmed instance when ``programmed`` is given."""
    b = inline_group(group, store, dtype, programmed, periphery, list(ANALOG_INPUTS), ANALOG_OUTPUT)
    glob = [*group.node.input[:3], group.node.output[0]]
    local = [*ANALOG_INPUTS, ANALOG_OUTPUT]
    typ = {}
    for loc, g in zip(local, glob):
        if g in types:
            vi = ValueInfoProto()
            vi.CopyFrom(types[g])
            vi.name = loc
            typ[loc] = vi
    suffix = "" if programmed is None else ".instance"
    return Partition(f"analog_L{group.layer}{suffix}", "analog", b.nodes, b.initializers, list(ANALOG_INPUTS),
                     [ANALOG_OUTPUT], dict(zip(local, glob)), typ, group.layer, {group.layer: group.expert_ids},
                     [_module_of(group.node, "model.") or f"layers.{group.layer}.experts"])


ProgramFn = Callable[[GroupNode], tuple[list[ProgrammedExpert], TilePeriphery]]
