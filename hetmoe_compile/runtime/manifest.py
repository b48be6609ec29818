"""Read and check an export's ``manifest.json``: schema, version, files and their sha256 (no torch)."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import cast

from ..errors import HetMoEError
from ..io import read_json_file

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = "1.0"


@cache
def manifest_schema() -> dict:
    return json.loads(resources.files("hetmoe_compile.schemas").joinpath("manifest.schema.json").read_text())


def validate_manifest(doc: dict, source: str = "<manifest>") -> None:
    """Raise :class:`HetMoEError` for a newer major schema version or the first schema violation."""
    import jsonschema

    version = str(doc.get("schema_version", "")) if isinstance(doc, dict) else ""
    if version and version.split(".")[0] != MANIFEST_SCHEMA_VERSION.split(".")[0]:
        raise HetMoEError(
            f"{source}: manifest schema version {version} is newer than this runtime reads "
            f"({MANIFEST_SCHEMA_VERSION}); upgrade hetmoe-compile or re-export with this version"
        )
    try:
        jsonschema.validate(doc, manifest_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise HetMoEError(f"{source}: invalid manifest at {where}: {exc.message}") from exc
    names = [p["name"] for p in doc["partitions"]]
    for step in doc["schedule"]:
        if step["partition"] not in names:
            raise HetMoEError(f"{source}: schedule names partition '{step['partition']}', which is not listed")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def partition_files(entry: dict, variant: str = "ideal") -> list[tuple[str, str]]:
    """``(file, sha256)`` of a partition's model and data files for ``variant`` (``ideal`` or ``instance``)."""
    src = entry if variant == "ideal" else entry["instance"]
    return [(src["file"], src["sha256"])] + [(d["file"], d["sha256"]) for d in src["external_data"]]


def check_files(directory: Path, entry: dict, variant: str = "ideal", verify_hashes: bool = True) -> Path:
    """The partition's ONNX path, after checking that its files exist and match their sha256."""
    for name, digest in partition_files(entry, variant):
        path = directory / name
        if not path.is_file():
            raise HetMoEError(
                f"partition '{entry['name']}': file {name} is missing from {directory}; "
                "copy the whole export directory or re-export"
            )
        if verify_hashes and file_sha256(path) != digest:
            raise HetMoEError(
                f"partition '{entry['name']}': {name} does not match its sha256 in the manifest "
                "(the file was modified or truncated); re-export or restore the file"
            )
    return directory / (entry["file"] if variant == "ideal" else entry["instance"]["file"])


def read_manifest(directory: str | Path) -> dict:
    """The validated manifest of the export in ``directory``."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    # any JSON value until validated (validate_manifest rejects all but a manifest object)
    doc = cast(
        dict,
        read_json_file(path, f"{directory}: no {MANIFEST_NAME}; pass a directory written by 'hetmoe-compile export'"),
    )
    validate_manifest(doc, str(path))
    return doc
