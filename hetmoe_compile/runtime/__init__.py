"""Torch-free runtime for an exported model: ``load(DIR)`` checks the manifest and returns a :class:`Runner`.

Imports only numpy, jsonschema and onnxruntime (plus ``tokenizers`` for text prompts), so an accelerator
toolchain can consume an export without PyTorch installed.
"""

from .manifest import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, read_manifest, validate_manifest
from .runner import Runner, load
from .sampling import Sampling

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA_VERSION",
    "Runner",
    "Sampling",
    "load",
    "read_manifest",
    "validate_manifest",
]
