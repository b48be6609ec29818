"""Build ``manifest.json`` from the written partitions (schema: ``hetmoe_compile/schemas/manifest.schema.json``)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from onnx import ModelProto, ValueInfoProto, helper

from ..analog.config import AnalogConfig
from ..base.io import atomic_write_text, finite_json
from ..placement.placement import Placement
from ..runtime.manifest import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, file_sha256, validate_manifest
from .partition import Partition

__all__ = ["MANIFEST_NAME", "build_manifest", "tensor_spec", "write_manifest"]

WEIGHT_NAMING = (
    "L<layer>.E<expert>.gate_up [2I, H] (gate rows then up rows) and L<layer>.E<expert>.down [H, I], "
    "[out, in] layout; biases .gate_up_bias/.down_bias; an instance holds .programmed [C, T, out] "
    "normalised conductances and .scale [C, 1, out] per matrix (and .input_range [C, 1, 1] under constant noise "
    "management, whose ranges for every expert are analog.input_ranges)"
)


def tensor_spec(vi: ValueInfoProto) -> dict:
    """``{name, dtype, shape}`` with symbolic dimensions as strings (``batch``, ``seq``, ``batch*seq``)."""
    t = vi.type.tensor_type
    shape = None
    if t.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": vi.name, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)), "shape": shape}


def _files(paths: list[Path]) -> dict:
    return {
        "file": paths[0].name,
        "sha256": file_sha256(paths[0]),
        "external_data": [{"file": p.name, "sha256": file_sha256(p)} for p in paths[1:]],
    }


def _tokenizer_files(directory: Path) -> list[dict]:
    return [{"file": p.name, "sha256": file_sha256(p)} for p in sorted(directory.iterdir()) if p.is_file()]


def build_manifest(
    *,
    placement: Placement,
    cfg: AnalogConfig,
    instance_seed: int | None,
    parts: list[Partition],
    files: dict[str, list[Path]],
    variants: dict[str, list[Path]],
    directory: Path,
    graph: ModelProto,
    opset: int,
    producer: str,
    has_tokenizer: bool,
    monolithic: bool,
    extra_model: dict | None = None,
    contrib_ops: list[str] | None = None,
    cost: dict | None = None,
) -> dict:
    """The manifest document; ``cost`` is the cost-model estimate of the export (optional ``"cost"`` key)."""
    doc = placement.to_dict()
    partitions, schedule = [], []
    for part in parts:
        entry = {
            "name": part.name,
            "device": part.device,
            **_files(files[part.name]),
            "inputs": [tensor_spec(part.types[n]) for n in part.inputs],
            "outputs": [tensor_spec(part.types[n]) for n in part.outputs],
            "source_modules": part.source_modules,
            "layer": part.layer,
            "experts": {str(k): v for k, v in sorted(part.expert_ids.items())},
        }
        if part.expert_ids:
            entry["weights"] = WEIGHT_NAMING
        if part.activation is not None:
            entry["activation"] = asdict(part.activation)
        if part.name in variants:
            if instance_seed is None:
                raise ValueError("instance variants need the instance_seed they were programmed with")
            entry["instance"] = {**_files(variants[part.name]), "seed": int(instance_seed)}
        partitions.append(entry)
        schedule.append(
            {
                "partition": part.name,
                "inputs": {n: part.bindings[n] for n in part.inputs},
                "outputs": {n: part.bindings[n] for n in part.outputs},
            }
        )
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "producer": producer,
        "model": {**doc["model"], **(extra_model or {})},
        "placement": {k: doc[k] for k in ("policy", "layers", "dense_modules")},
        "analog": {"config": cfg.to_dict(), "instance_seed": instance_seed},
        "inputs": [tensor_spec(v) for v in graph.graph.input],
        "outputs": [tensor_spec(v) for v in graph.graph.output],
        "partitions": partitions,
        "schedule": schedule,
        "parameter_share": doc["parameter_share"],
        "opset": opset,
        "tokenizer": "tokenizer" if has_tokenizer else None,
        **({"tokenizer_files": _tokenizer_files(directory / "tokenizer")} if has_tokenizer else {}),
        "monolithic": monolithic,
        "contrib_ops": list(contrib_ops or []),
    }
    if cost is not None:
        manifest["cost"] = cost
    return manifest


def write_manifest(doc: dict, path: Path) -> Path:
    validate_manifest(doc, str(path))
    return atomic_write_text(path, finite_json(doc, str(path)) + "\n")
