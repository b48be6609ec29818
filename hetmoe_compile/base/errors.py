"""User-facing errors: one line naming the problem and the fix; the CLI maps them to exit code 2."""

from __future__ import annotations


class HetMoEError(Exception):
    """A problem with the user's input (path, model, option). The message says what is wrong and how to fix it."""


class UnsupportedModelError(HetMoEError):
    """The model's architecture has no adapter, or the model has no MoE layer."""


class NoTokenizerError(HetMoEError):
    """The model has no tokenizer files at all (as opposed to a tokenizer file that is corrupt)."""


def check_seed(value: object, name: str = "seed") -> int:
    """``value`` if it is an integer >= 0 (a seed); else a :class:`HetMoEError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HetMoEError(f"{name}={value!r} must be an integer >= 0")
    return value


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a :class:`HetMoEError` listing them."""
    if value not in choices:
        raise HetMoEError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return str(value)
