"""The tokenizer saved beside an export, read with the ``tokenizers`` library (no torch, no transformers)."""

from __future__ import annotations

from pathlib import Path

from ..base.errors import HetMoEError
from .manifest import check_file


def load_export_tokenizer(directory: Path, manifest: dict, verify_hashes: bool = True):
    """A ``tokenizers.Tokenizer`` from ``<export>/tokenizer/tokenizer.json``, after checking the tokenizer files
    against their sha256 in the manifest (``tokenizer_files``, schema 1.1; older manifests have none to check)."""
    from tokenizers import Tokenizer

    sub = manifest.get("tokenizer")
    path = Path(directory) / (sub or "tokenizer") / "tokenizer.json"
    if not sub or not path.is_file():
        raise HetMoEError(
            f"{directory}: the export has no tokenizer (tokenizer/tokenizer.json); "
            "pass token ids with --ids, or export a model that has tokenizer.json beside it"
        )
    for f in manifest.get("tokenizer_files", []):
        check_file(Path(directory), f"{sub}/{f['file']}", f["sha256"], "tokenizer", verify=verify_hashes)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable JSON or an unknown model
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HetMoEError(
            f"{path}: not a readable tokenizer file ({reason}); restore it from the model or re-export"
        ) from exc
