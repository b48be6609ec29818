"""The tokenizer saved beside an export, read with the ``tokenizers`` library (no torch, no transformers)."""

from __future__ import annotations

from pathlib import Path

from ..errors import HetMoEError


def load_export_tokenizer(directory: Path, manifest: dict):
    """A ``tokenizers.Tokenizer`` from ``<export>/tokenizer/tokenizer.json``."""
    from tokenizers import Tokenizer

    sub = manifest.get("tokenizer")
    path = Path(directory) / (sub or "tokenizer") / "tokenizer.json"
    if not sub or not path.is_file():
        raise HetMoEError(
            f"{directory}: the export has no tokenizer (tokenizer/tokenizer.json); "
            "pass token ids with --ids, or export a model that has tokenizer.json beside it"
        )
    return Tokenizer.from_file(str(path))
