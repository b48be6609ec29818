"""Read and check an export's ``manifest.json``: schema, version, schedule, files, their sha256 and what each
partition file says it holds (no torch)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import cast

from ..base.errors import HetMoEError
from ..base.io import read_json_file
from .onnx_meta import read_model_props

MANIFEST_NAME = "manifest.json"
MANIFEST_KEYS = ("producer", "schema_version", "partitions", "schedule")
"""What marks a directory's ``manifest.json`` as an export's, beside its hetmoe-compile producer: only such a
directory is replaced by a new export."""
MANIFEST_SCHEMA_VERSION = "1.1"
"""1.1: partition identity in each ONNX file's ``metadata_props``, ``model.context_length``, ``tokenizer_files``."""

IDENTITY_PREFIX = "hetmoe."
IDENTITY_FIELDS = ("partition", "device", "layer", "experts", "variant", "instance_seed")
"""What a partition file says it holds (``metadata_props`` keys ``hetmoe.<field>``, plus ``hetmoe.schema_version``),
checked against its manifest entry at load."""


@cache
def manifest_schema() -> dict:
    return json.loads(resources.files("hetmoe_compile.base.schemas").joinpath("manifest.schema.json").read_text())


def validate_manifest(doc: dict, source: str = "<manifest>") -> None:
    """Raise :class:`HetMoEError` for a newer major schema version, the first schema violation, or a schedule
    whose data flow is broken (a step reading a tensor nothing before it produces, an unknown partition, a model
    output no step produces)."""
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
    _check_schedule(doc, source)


def _check_schedule(doc: dict, source: str) -> None:
    """Every step names a listed partition and binds exactly its inputs and outputs; every input is a model input
    or an output of an earlier step; every model output is produced."""
    fix = "re-export (the manifest's schedule or partitions were edited)"
    partitions = {p["name"]: p for p in doc["partitions"]}
    if len(partitions) != len(doc["partitions"]):
        raise HetMoEError(f"{source}: two partitions have the same name; {fix}")
    available = {t["name"] for t in doc["inputs"]}
    for i, step in enumerate(doc["schedule"]):
        name = step["partition"]
        where = f"{source}: schedule step {i} ('{name}')"
        if name not in partitions:
            raise HetMoEError(f"{source}: schedule names partition '{name}', which is not listed; {fix}")
        for kind in ("inputs", "outputs"):
            declared = [t["name"] for t in partitions[name][kind]]
            if sorted(step[kind]) != sorted(declared):
                raise HetMoEError(f"{where} binds {kind} {sorted(step[kind])}, the partition has {declared}; {fix}")
        for local, tensor in step["inputs"].items():
            if tensor not in available:
                raise HetMoEError(
                    f"{where}: input '{local}' reads tensor '{tensor}', which is neither a model input nor an "
                    f"output of an earlier step; {fix}"
                )
        available.update(step["outputs"].values())
    for out in doc["outputs"]:
        if out["name"] not in available:
            raise HetMoEError(f"{source}: no schedule step produces the model output '{out['name']}'; {fix}")


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


def partition_variants(entry: dict) -> list[str]:
    """The variants a partition entry lists files for: ``ideal``, and ``instance`` when it has one."""
    return ["ideal", "instance"] if "instance" in entry else ["ideal"]


def _experts_key(experts: Mapping) -> str:
    return json.dumps({str(k): [int(e) for e in v] for k, v in experts.items()}, sort_keys=True, separators=(",", ":"))


def partition_identity(
    name: str,
    device: str,
    layer: int | None,
    experts: Mapping[int, Sequence[int]] | Mapping[str, Sequence[int]],
    variant: str = "ideal",
    instance_seed: int | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` the exporter writes into a partition file, and the runtime expects of it."""
    ident = {
        "partition": name,
        "device": device,
        "layer": "" if layer is None else str(int(layer)),
        "experts": _experts_key(experts),
        "variant": variant,
    }
    if instance_seed is not None:
        ident["instance_seed"] = str(int(instance_seed))
    return {IDENTITY_PREFIX + "schema_version": MANIFEST_SCHEMA_VERSION} | {
        IDENTITY_PREFIX + k: v for k, v in ident.items()
    }


def entry_identity(entry: dict, variant: str = "ideal") -> dict[str, str]:
    """What the manifest entry claims the file of ``variant`` holds."""
    seed = entry["instance"]["seed"] if variant == "instance" else None
    return partition_identity(entry["name"], entry["device"], entry.get("layer"), entry["experts"], variant, seed)


_LEGACY_DOC = re.compile(r"hetmoe-compile partition (\S+) \((\w+)\)(?::\s*(.*))?", re.S)


def _legacy_identity(doc: str) -> dict[str, str]:
    """The identity in the ``doc_string`` of files written before schema 1.1 (name, device, experts), or ``{}``."""
    m = _LEGACY_DOC.fullmatch(doc.strip())
    if not m:
        return {}
    name, device, rest = m.groups()
    experts = {
        int(layer): [int(e) for e in ids.split(",") if e.strip()]
        for layer, ids in re.findall(r"layer (\d+): experts \[([^\]]*)\]", rest or "")
    }
    variant = "instance" if name.endswith(".instance") else "ideal"
    return {
        IDENTITY_PREFIX + "partition": name.removesuffix(".instance"),
        IDENTITY_PREFIX + "device": device,
        IDENTITY_PREFIX + "experts": _experts_key(experts),
        IDENTITY_PREFIX + "variant": variant,
    }


def _describe(ident: dict[str, str], fields: list[str]) -> str:
    return ", ".join(f"{f} {ident.get(IDENTITY_PREFIX + f) or '-'}" for f in fields)


def check_identity(path: Path, entry: dict, variant: str = "ideal") -> None:
    """Refuse a partition file that holds another partition, layer, experts or variant than its entry claims."""
    owner = f"partition '{entry['name']}'"
    try:
        props, doc = read_model_props(path)
    except (OSError, ValueError) as exc:
        raise HetMoEError(f"{owner}: {path.name} is not a readable ONNX file ({exc}); re-export") from exc
    held = {k: v for k, v in props.items() if k.startswith(IDENTITY_PREFIX)} or _legacy_identity(doc)
    if IDENTITY_PREFIX + "partition" not in held:
        raise HetMoEError(
            f"{owner}: {path.name} does not say which partition it holds (no hetmoe metadata); "
            f"re-export with this version of hetmoe-compile"
        )
    claimed = entry_identity(entry, variant)
    keys = [IDENTITY_PREFIX + f for f in IDENTITY_FIELDS]
    differ = [k.removeprefix(IDENTITY_PREFIX) for k in keys if k in held and held[k] != claimed.get(k)]
    if differ:
        raise HetMoEError(
            f"{owner}: {path.name} holds {_describe(held, differ)}, but the manifest claims "
            f"{_describe(claimed, differ)} (manifest entries swapped or edited); re-export"
        )


def check_file(directory: Path, name: str, digest: str, owner: str, required: bool = True, verify: bool = True) -> bool:
    """Whether ``directory / name`` exists (an error if ``required``) and matches ``digest`` (when ``verify``)."""
    path = directory / name
    if not path.is_file():
        if not required:
            return False
        raise HetMoEError(
            f"{owner}: file {name} is missing from {directory}; copy the whole export directory or re-export"
        )
    if verify and file_sha256(path) != digest:
        raise HetMoEError(
            f"{owner}: {name} does not match its sha256 in the manifest "
            "(the file was modified or truncated); re-export or restore the file"
        )
    return True


def check_files(
    directory: Path, entry: dict, variant: str = "ideal", verify_hashes: bool = True, required: bool = True
) -> Path:
    """The partition's ONNX path, after checking that its files exist, match their sha256 (``verify_hashes``) and
    hold the partition the entry claims. With ``required=False`` missing files are skipped, present ones checked."""
    owner = f"partition '{entry['name']}'"
    files = partition_files(entry, variant)
    present = [check_file(directory, n, d, owner, required, verify_hashes) for n, d in files]
    path = directory / files[0][0]
    if present[0]:
        check_identity(path, entry, variant)
    return path


def read_manifest(directory: str | Path) -> dict:
    """The validated manifest of the export in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise HetMoEError(f"{directory} {what}; pass a directory written by 'hetmoe-compile export'")
    path = directory / MANIFEST_NAME
    # any JSON value until validated (validate_manifest rejects all but a manifest object)
    doc = cast(
        dict,
        read_json_file(path, f"{directory}: no {MANIFEST_NAME}; pass a directory written by 'hetmoe-compile export'"),
    )
    validate_manifest(doc, str(path))
    return doc
