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
from dataclasses import dataclass, field

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, ValueInfoProto, helper

from ..base.errors import HetMoEError
from .expert_group_onnx import (
    Activation,
    ExpertArrays,
    ProgrammedExpert,
    TilePeriphery,
    expert_group_body,
    ort_moe_body,
)
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
    top_k: int = 0

    def experts(self, store: TensorStore) -> list[ExpertArrays]:
        """Lazy per-expert weights read from the group's stacked initializers."""
        names = list(self.node.input)
        bias = len(names) > 6 and names[6]
        return [
            ExpertArrays(
                e,
                store.ref(names[4], i),
                store.ref(names[5], i),
                store.ref(names[6], i) if bias else None,
                store.ref(names[7], i) if bias else None,
            )
            for i, e in enumerate(self.expert_ids)
        ]


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
    activation: Activation | None = None  # the experts' activation (expert-group partitions)


def find_groups(model: ModelProto, store: TensorStore, group_of: dict[str, tuple[int, str]]) -> list[GroupNode]:
    """The placeholders, resolved to ``(layer, device)`` by their ``gate_up`` initializer's name."""
    out = []
    types = value_types(model)
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != PLACEHOLDER:
            continue
        if node.input[4] not in group_of:
            raise ValueError(f"expert group with weights '{node.input[4]}' is not in the placement")
        layer, device = group_of[node.input[4]]
        attrs = _attrs(node)
        act = Activation(
            _str(attrs.get("activation", "glu")),
            _str(attrs.get("act_name", "silu")),
            float(attrs.get("alpha", 0.0)),
            float(attrs.get("limit", 0.0)),
        )
        ids = [int(i) for i in store.load(node.input[3]).reshape(-1)]
        dims = types[node.input[1]].type.tensor_type.shape.dim if node.input[1] in types else []
        top_k = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else 0
        out.append(GroupNode(node, layer, device, ids, act, top_k))
    return out


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def inline_group(
    group: GroupNode,
    store: TensorStore,
    dtype: np.dtype,
    programmed: list[ProgrammedExpert] | None = None,
    periphery: TilePeriphery | None = None,
    inputs: list[str] | None = None,
    output: str | None = None,
    ort_moe: bool = False,
    lowbit: tuple[int, int] | None = None,
) -> GraphBuilder:
    """The body of ``group`` (on the placeholder's tensors unless ``inputs``/``output`` are given): standard ops,
    with ``ort_moe`` one ``com.microsoft::MoE`` node, with ``lowbit = (bits, group_size)`` ``MatMulNBits``."""
    b = GraphBuilder(f"hetmoe/L{group.layer}/{group.device}/")
    hidden, index, weights = inputs or list(group.node.input[:3])
    out = output or group.node.output[0]
    if ort_moe:
        if not group.top_k:
            raise HetMoEError(f"layer {group.layer}: the routing width K is not static; export without --ort-moe")
        ort_moe_body(
            b,
            hidden,
            index,
            weights,
            out,
            group.experts(store),
            group.act,
            dtype,
            int(_attrs(group.node).get("num_experts", 0)),
            group.top_k,
            group.layer,
        )
    else:
        expert_group_body(
            b,
            hidden,
            index,
            weights,
            out,
            group.experts(store),
            group.act,
            dtype,
            programmed,
            periphery,
            group.layer,
            lowbit,
        )
    return b


def _attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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
            return mods[-1][len(root_prefix) :] if mods else None
    return None


@dataclass
class _Stages:
    """Nodes grouped by stage: digital nodes (with inlined digital groups) per stage, analog groups per stage."""

    digital: dict[int, list[NodeProto]] = field(default_factory=dict)
    body_inits: dict[int, dict[str, object]] = field(default_factory=dict)
    modules: dict[int, list[str]] = field(default_factory=dict)
    experts: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    analog: list[tuple[int, GroupNode]] = field(default_factory=list)
    constants: dict[str, NodeProto] = field(default_factory=dict)


def _assign_stages(
    model: ModelProto,
    store: TensorStore,
    groups: list[GroupNode],
    dtype: np.dtype,
    root_prefix: str,
    monolithic: bool,
    ort_moe: bool,
    lowbit: dict[int, tuple[int, int]],
) -> _Stages:
    by_node = {id(g.node): g for g in groups}
    out = _Stages()
    stage: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and not node.input:
            out.constants.update({o: node for o in node.output})  # copied into every partition that uses it
            continue
        s = max((stage.get(n, 0) for n in _node_inputs(node)), default=0)
        group = by_node.get(id(node))
        if group is not None and group.device == "analog" and not monolithic:
            out.analog.append((s, group))
            stage[node.output[0]] = s + 1
            continue
        stage.update({o: s for o in node.output})
        mod = _module_of(node, root_prefix)
        if mod and mod not in out.modules.setdefault(s, []):
            out.modules[s].append(mod)
        del node.metadata_props[:]  # the exporter's stack traces; the manifest keeps the module paths
        if group is None:
            out.digital.setdefault(s, []).append(node)
            continue
        digital = group.device == "digital"
        b = inline_group(
            group, store, dtype, ort_moe=ort_moe and digital, lowbit=lowbit.get(group.layer) if digital else None
        )
        out.digital.setdefault(s, []).extend(b.nodes)
        out.body_inits.setdefault(s, {}).update(b.initializers)
        out.experts.setdefault(s, {}).setdefault(group.layer, []).extend(group.expert_ids)
    return out


def partition_graph(
    model: ModelProto,
    store: TensorStore,
    groups: list[GroupNode],
    dtype: np.dtype,
    root_prefix: str,
    monolithic: bool = False,
    ort_moe: bool = False,
    lowbit: dict[int, tuple[int, int]] | None = None,
) -> list[Partition]:
    """Split ``model`` into the scheduled partitions (``monolithic``: one partition, analog groups inlined ideal;
    ``ort_moe``: digital expert groups as ``com.microsoft::MoE`` nodes; ``lowbit``: layer -> ``(bits, group_size)``
    of low-bit digital experts, emitted as ``MatMulNBits``).

    Analog partitions are returned with their ideal body; :func:`analog_partition` builds instance variants."""
    st = _assign_stages(model, store, groups, dtype, root_prefix, monolithic, ort_moe, lowbit or {})
    order: list[tuple[str, int | GroupNode]] = []  # ("digital", stage) or ("analog", group), in execution order
    for s in sorted(set(st.digital) | {s for s, _ in st.analog}):
        if s in st.digital:
            order.append(("digital", s))
        order += [("analog", g) for gs, g in st.analog if gs == s]

    def name_of(kind: str, key) -> str:
        if kind == "analog":
            return f"analog_L{key.layer}"
        return "model" if monolithic else f"digital_{key}"

    consumers: dict[str, set[str]] = {n.name: {"<output>"} for n in model.graph.output}
    for kind, key in order:
        used = (
            list(key.node.input[:3])
            if isinstance(key, GroupNode)  # analog
            else [n for node in st.digital[key] for n in _node_inputs(node)]
        )
        for n in used:
            consumers.setdefault(n, set()).add(name_of(kind, key))
    types = value_types(model)
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input]
    parts = []
    for kind, key in order:
        if isinstance(key, GroupNode):  # analog
            parts.append(analog_partition(key, store, dtype, types, root_prefix=root_prefix))
        else:
            parts.append(_digital_partition(name_of(kind, key), key, st, store, inits, consumers, graph_inputs, types))
    return parts


def _digital_partition(
    name: str,
    stage: int,
    st: _Stages,
    store: TensorStore,
    inits: set[str],
    consumers: dict[str, set[str]],
    graph_inputs: list[str],
    types: dict[str, ValueInfoProto],
) -> Partition:
    """One digital stage: its inputs are the tensors it reads that no node, initializer or constant of it makes;
    its outputs are the tensors it makes that another partition (or the model output) reads."""
    nodes = st.digital[stage]
    produced = {o for node in nodes for o in node.output}
    body = st.body_inits.get(stage, {})
    needed: dict[str, None] = {}
    weights: dict[str, object] = {}
    const_nodes: dict[int, NodeProto] = {}
    for n in (n for node in nodes for n in _node_inputs(node)):
        if n in produced:
            continue
        if n in inits:
            weights[n] = store.ref(n)
        elif n in body:
            weights[n] = body[n]
        elif n in st.constants:
            const_nodes[id(st.constants[n])] = st.constants[n]
        else:
            needed[n] = None
    outputs = [n for n in _ordered(nodes) if consumers.get(n, set()) - {name}]
    ins = [n for n in graph_inputs if n in needed] + [n for n in needed if n not in graph_inputs]
    return Partition(
        name,
        "digital",
        list(const_nodes.values()) + nodes,
        weights,
        ins,
        outputs,
        {n: n for n in ins + outputs},
        {n: types[n] for n in ins + outputs if n in types},
        expert_ids=st.experts.get(stage, {}),
        source_modules=st.modules.get(stage, []),
    )


def _ordered(nodes: list[NodeProto]) -> list[str]:
    return [o for node in nodes for o in node.output if o]


def analog_partition(
    group: GroupNode,
    store: TensorStore,
    dtype: np.dtype,
    types: dict[str, ValueInfoProto],
    programmed: list[ProgrammedExpert] | None = None,
    periphery: TilePeriphery | None = None,
    root_prefix: str = "model.",
) -> Partition:
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
    return Partition(
        f"analog_L{group.layer}{suffix}",
        "analog",
        b.nodes,
        b.initializers,
        list(ANALOG_INPUTS),
        [ANALOG_OUTPUT],
        dict(zip(local, glob)),
        typ,
        group.layer,
        {group.layer: group.expert_ids},
        [_module_of(group.node, root_prefix) or f"layers.{group.layer}.experts"],
        group.act,
    )
