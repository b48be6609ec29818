"""Human units for the cost model: byte sizes (``64MiB``, ``1.5GB``) and SI-prefixed energies and rates."""

from __future__ import annotations

import math
import re

from ..base.errors import HetMoEError

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int, option: str = "--digital-memory-budget") -> int:
    """``"12000000"``, ``"64MiB"``, ``"1.5GB"`` (decimal kB/MB/GB/TB; binary KiB/MiB/GiB/TiB and K/M/G/T) -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _BYTE_UNITS:
            raise HetMoEError(f"{option} '{text}': expected a size in bytes, e.g. 12000000, 64MiB or 1.5GB".lstrip())
        value = math.floor(float(m.group(1)) * _BYTE_UNITS[unit])
    if value <= 0:
        raise HetMoEError(f"{option} '{text}': the budget must be more than 0 bytes".lstrip())
    return int(value)


def parse_energy(text: str | float, option: str = "--energy-budget") -> float:
    """``"2.5e-3"`` (joules per token) -> 2.5e-3; must be a finite number > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise HetMoEError(f"{option} '{text}': expected joules per token, e.g. 2.5e-3".lstrip()) from None
    if not math.isfinite(value) or value <= 0:
        raise HetMoEError(f"{option} '{text}': the budget must be a finite number of joules per token > 0".lstrip())
    return value


def format_bytes(n: float) -> str:
    """``12582912`` -> ``"12.0 MiB"``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_si(value: float, unit: str, digits: int = 3) -> str:
    """``2.5e-3, "J"`` -> ``"2.50 mJ"``."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g} {unit}"
    prefixes = {-15: "f", -12: "p", -9: "n", -6: "µ", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T"}
    exp = max(-15, min(12, 3 * math.floor(math.log10(abs(value)) / 3)))
    scaled = value / 10**exp
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(scaled)))) if scaled else 0
    return f"{scaled:.{decimals}f} {prefixes[exp]}{unit}"


def format_budget(kind: str, value: float) -> str:
    """A budget of ``kind`` (``digital_memory``: bytes, ``energy``: joules per token) for people."""
    return format_bytes(value) if kind == "digital_memory" else f"{format_si(value, 'J', 4)}/token"
