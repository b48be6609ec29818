"""The placement.json JSON Schema (shipped in ``hetmoe_compile/schemas``) and its validation."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from ..base.errors import HetMoEError

SCHEMA_VERSION = "1.0"


@cache
def placement_schema() -> dict:
    return json.loads(resources.files("hetmoe_compile.base.schemas").joinpath("placement.schema.json").read_text())


def validate_placement(doc: dict, source: str = "<placement>") -> None:
    """Raise :class:`HetMoEError` naming the first schema violation (and the newer-version case), or the first
    expert not placed exactly once (see :func:`check_coverage`)."""
    import jsonschema

    if not isinstance(doc, dict):
        raise HetMoEError(
            f"{source}: a placement is a JSON object as 'hetmoe-compile place' writes it, got a JSON "
            f"{_json_kind(doc)}; re-run 'hetmoe-compile place'"
        )
    version = str(doc.get("schema_version", ""))
    if version and version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise HetMoEError(
            f"{source}: placement schema version {version} is not supported by this hetmoe-compile "
            f"(reads {SCHEMA_VERSION}); upgrade hetmoe-compile or re-run 'hetmoe-compile place'"
        )
    try:
        jsonschema.validate(doc, placement_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise HetMoEError(f"{source}: invalid placement at {where}: {exc.message}") from exc
    for i, layer in enumerate(doc["layers"]):  # JSON Schema counts 3.0 as an integer; an id is not a float
        for j, expert in enumerate(layer["experts"]):
            for where, value in ((f"layers/{i}/index", layer["index"]), (f"layers/{i}/experts/{j}/id", expert["id"])):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise HetMoEError(
                        f"{source}: invalid placement at {where}: {value!r} is not an integer; re-run "
                        "'hetmoe-compile place'"
                    )
    model = doc["model"]
    check_coverage(
        [(layer["index"], [e["id"] for e in layer["experts"]]) for layer in doc["layers"]],
        model.get("moe_layers"),
        model.get("num_experts"),
        source,
    )


def check_coverage(layers: list[tuple[int, list[int]]], moe_layers: list[int] | None, num_experts, source: str) -> None:
    """Every expert of every MoE layer placed once: ``layers`` are ``(layer index, expert ids)``, ``moe_layers``
    the model's MoE layer indices and ``num_experts`` their expert count (an int, or a dict layer -> count);
    ``None`` skips that part of the check."""
    fix = "a placement names every expert of every MoE layer once; re-run 'hetmoe-compile place'"
    seen: set[int] = set()
    for index, _ in layers:
        if index in seen:
            raise HetMoEError(f"{source}: layer {index} is listed twice; {fix}")
        seen.add(index)
    if moe_layers is not None:
        extra, missing = sorted(seen - set(moe_layers)), sorted(set(moe_layers) - seen)
        if extra:
            raise HetMoEError(
                f"{source}: layer {extra[0]} is not an MoE layer of the model (its MoE layers are "
                f"{sorted(moe_layers)}); {fix}"
            )
        if missing:
            raise HetMoEError(f"{source}: MoE layer(s) {missing} are missing; {fix}")
    for index, ids in layers:
        if len(set(ids)) != len(ids):
            twice = sorted({e for e in ids if ids.count(e) > 1})
            raise HetMoEError(f"{source}: layer {index} lists expert(s) {twice} more than once; {fix}")
        n = num_experts.get(index) if isinstance(num_experts, dict) else num_experts
        if n is None:
            continue
        extra, missing = sorted(set(ids) - set(range(n))), sorted(set(range(n)) - set(ids))
        if extra:
            raise HetMoEError(
                f"{source}: layer {index} names expert {extra[0]}, but the layer has experts 0..{n - 1}; {fix}"
            )
        if missing:
            raise HetMoEError(f"{source}: layer {index} does not place expert(s) {missing}; {fix}")


def _json_kind(value) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")
