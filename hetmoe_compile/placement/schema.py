"""The placement.json JSON Schema (shipped in ``hetmoe_compile/schemas``) and its validation."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from ..errors import HetMoEError

SCHEMA_VERSION = "1.0"


@cache
def placement_schema() -> dict:
    return json.loads(resources.files("hetmoe_compile.schemas").joinpath("placement.schema.json").read_text())


def validate_placement(doc: dict, source: str = "<placement>") -> None:
    """Raise :class:`HetMoEError` naming the first schema violation (and the newer-version case)."""
    import jsonschema

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
