"""Translate a tagged ``ExportedProgram`` to one ONNX graph in which every expert group is a placeholder node.

Each ``hetmoe::expert_group`` node becomes ``hetmoe.ExpertGroup(hidden, top_k_index, top_k_weights, expert_ids,
gate_up, down[, gate_up_bias, down_bias])`` with the op's attributes; :mod:`.partition` later inlines the digital
groups' standard-op bodies and cuts the analog ones out as partitions. The graph is saved with external data into a
scratch directory and read back without it, so no 2 GB protobuf limit applies and weights stay on disk.
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx.defs import OpSchema
from torch.export import ExportedProgram

from ..base.errors import HetMoEError
from ..ir.expert_group import GROUP_TENSORS, ROUTING_INPUTS, SETTINGS, ExpertGroupCall

DOMAIN = "hetmoe"
PLACEHOLDER = "ExpertGroup"
OPSET = 20
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


_SETTING_TYPES = {
    "num_experts": (OpSchema.AttrType.INT, "experts in the layer"),
    "activation": (OpSchema.AttrType.STRING, "glu or gpt_oss_glu"),
    "act_name": (OpSchema.AttrType.STRING, "activation function"),
    "alpha": (OpSchema.AttrType.FLOAT, "gpt_oss_glu alpha"),
    "limit": (OpSchema.AttrType.FLOAT, "gpt_oss_glu limit"),
}
assert tuple(_SETTING_TYPES) == SETTINGS
_KIND = {n: "I" if n in ("top_k_index", "expert_ids") else "T" for n in ROUTING_INPUTS + GROUP_TENSORS}


def register_placeholder_schema() -> None:
    """Register ``hetmoe.ExpertGroup`` (version 1) with ONNX so onnxscript can emit it."""
    try:
        onnx.defs.get_schema(PLACEHOLDER, 1, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    opt = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        PLACEHOLDER,
        DOMAIN,
        1,
        doc="Routed contribution of a group of MoE experts (placeholder replaced by hetmoe-compile).",
        inputs=[  # ExpertGroupCall's tensors, in its order; the biases optional
            P(n, _KIND[n], param_option=opt) if n.endswith("_bias") else P(n, _KIND[n])
            for n in ROUTING_INPUTS + GROUP_TENSORS
        ],
        outputs=[P("output", "T")],
        type_constraints=[("T", FLOATS, "float tensors"), ("I", ["tensor(int64)"], "indices")],
        attributes=[A(name, kind, doc) for name, (kind, doc) in _SETTING_TYPES.items()],  # its settings
    )
    onnx.defs.register_schema(schema)


def _translate(
    hidden,
    top_k_index,
    top_k_weights,
    expert_ids,
    gate_up,
    down,
    gate_up_bias=None,
    down_bias=None,
    num_experts=0,
    activation="glu",
    act_name="silu",
    alpha=0.0,
    limit=0.0,
):
    import onnxscript

    het = onnxscript.values.Opset(DOMAIN, 1)
    inputs = [hidden, top_k_index, top_k_weights, expert_ids, gate_up, down]
    if gate_up_bias is not None or down_bias is not None:
        inputs += [gate_up_bias, down_bias]
    return het.ExpertGroup(
        *inputs,
        num_experts=int(num_experts),
        activation=str(activation),
        act_name=str(act_name),
        alpha=float(alpha),
        limit=float(limit),
    )


assert tuple(inspect.signature(_translate).parameters) == ExpertGroupCall._fields  # the op's arguments, by name


@dataclass
class CapturedGraph:
    """The placeholder graph (weights as external data in ``directory``)."""

    model: onnx.ModelProto
    directory: Path


class _NoTorchvisionNotice(logging.Filter):
    """Drops the exporter registry's "torchvision is not installed. Skipping torchvision::<op>" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exactly two notices of torch's ONNX exporter that concern no user of this package: the registry's
    four "torchvision is not installed" lines (no model here has torchvision ops) and torch's own deprecation of
    ``LeafSpec`` (torch.export's pytree specs use it internally). Everything else is still shown."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _NoTorchvisionNotice()
    registry.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
            )
            yield
    finally:
        registry.removeFilter(notice)


def to_onnx(ep: ExportedProgram, directory: Path, cache_layers: int = 0) -> CapturedGraph:
    """Translate ``ep`` to ONNX with expert-group placeholders; write it (external data) under ``directory``.
    ``cache_layers``: the graph of a KV-cached capture with that many layers (its cache inputs and outputs get
    ONNX Runtime GenAI's names, see :mod:`hetmoe_compile.graph.kv_cache`)."""
    register_placeholder_schema()
    table: dict[Callable[..., Any], Callable[..., Any]] = {torch.ops.hetmoe.expert_group.default: _translate}
    path = directory / "graph.onnx"
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                ep, dynamo=True, custom_translation_table=table, optimize=True, opset_version=OPSET, verbose=False
            )
        except Exception as exc:  # one line for the user; the traceback stays chained
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HetMoEError(f"ONNX translation failed: {first}") from exc
        assert program is not None  # dynamo=True returns an ONNXProgram
        program.save(path, external_data=True)
    del program
    model = onnx.load(str(path), load_external_data=False)
    if cache_layers:
        _name_cache(model, cache_layers)
    _name_dims(model)
    _name_output(model, "logits")
    return CapturedGraph(model, directory)


def _rename(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename graph tensors everywhere they occur (inputs, outputs, node ends, value infos)."""
    for node in model.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        vi.name = names.get(vi.name, vi.name)


def _name_cache(model: onnx.ModelProto, layers: int) -> None:
    """``past_key_values_<k>`` -> ``past_key_values.<i>.key|value``, outputs after the logits -> ``present.<i>...``,
    and the symbols of the past and total lengths -> ``past``, ``total``."""
    from ..graph.kv_cache import past_names, present_names

    inputs = [i.name for i in model.graph.input]
    past = [n for n in inputs if n.startswith("past_key_values")]
    outputs = [o.name for o in model.graph.output][1:]
    if len(past) != 2 * layers or len(outputs) != 2 * layers:
        raise HetMoEError(
            f"the cached graph has {len(past)} cache inputs and {len(outputs)} cache outputs; expected {2 * layers}"
        )
    _rename(model, {**dict(zip(past, past_names(layers))), **dict(zip(outputs, present_names(layers)))})
    symbols: dict[str, str] = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name == "attention_mask" and len(dims) == 2 and dims[1].dim_param:
            symbols.setdefault(dims[1].dim_param, "total")
        if inp.name.startswith("past_key_values.") and len(dims) == 4 and dims[2].dim_param:
            symbols.setdefault(dims[2].dim_param, "past")
    _relabel(model, symbols)


def _relabel(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Substitute dimension symbols in every dim_param (``s36 + s70`` -> ``past + seq``)."""
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def _name_dims(model: onnx.ModelProto) -> None:
    """Rename the exporter's symbols (``s43``) after the inputs' axes: ``batch``, ``seq``, ``batch*seq``."""
    names: dict[str, str] = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for dim, label in zip(dims, ("batch", "seq")):
            if dim.dim_param and re.fullmatch(r"s\d+", dim.dim_param):
                names.setdefault(dim.dim_param, label)
    _relabel(model, names)


def _name_output(model: onnx.ModelProto, name: str) -> None:
    """Call the single graph output ``name`` (every reference renamed)."""
    old = model.graph.output[0].name
    if old == name:
        return
    for node in model.graph.node:
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = name
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = name
    model.graph.output[0].name = name
