"""User-facing errors: one line naming the problem and the fix; the CLI maps them to exit code 2."""

from __future__ import annotations


class HetMoEError(Exception):
    """A problem with the user's input (path, model, option). The message says what is wrong and how to fix it."""


class UnsupportedModelError(HetMoEError):
    """The model's architecture has no adapter, or the model has no MoE layer."""
