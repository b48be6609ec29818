"""Placement policy: how many experts go digital, chosen how, and where dense modules run."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..base.devices import DEVICES
from ..base.errors import HetMoEError, check_seed

SCOPES = ("per-layer", "global")


@dataclass
class PlacementPolicy:
    """Digital fraction of routed experts, the selector that ranks them, the scope of the ranking, where dense
    modules go (``analog`` is the paper's ablation) and per-expert overrides ``{"layer:expert": device}``; or,
    instead of the fraction, a digital-memory or energy budget (:mod:`hetmoe_compile.cost.budget`)."""

    digital_fraction: float = 0.25
    selector: str = "max-neuron-norm"
    scope: str = "per-layer"
    dense: str = "digital"
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    digital_memory_budget: int | None = None
    """Bytes of digital memory (dense modules + digital experts); when set, replaces ``digital_fraction``."""
    energy_budget: float | None = None
    """Joules per token (cost model estimate); when set, replaces ``digital_fraction``."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def budget(self) -> tuple[str, float] | None:
        """``("digital_memory", bytes)``, ``("energy", joules per token)`` or ``None`` (place by fraction)."""
        if self.digital_memory_budget is not None:
            return "digital_memory", self.digital_memory_budget
        if self.energy_budget is not None:
            return "energy", self.energy_budget
        return None

    def validate(self) -> None:
        f = self.digital_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise HetMoEError(f"digital_fraction={f!r} must be a number in [0, 1] (the share of digital experts)")
        if not 0.0 <= float(f) <= 1.0:
            raise HetMoEError(f"digital fraction must be in [0, 1], got {f}; e.g. 0.25 for a quarter of the experts")
        self.digital_fraction = float(f)
        check_seed(self.seed, "placement seed")
        if not isinstance(self.selector, str):
            raise HetMoEError(f"selector={self.selector!r} must be a selector name such as 'max-neuron-norm'")
        if not isinstance(self.overrides, dict):
            raise HetMoEError(f"overrides={self.overrides!r} must be a dict of 'LAYER:EXPERT' -> device")
        if self.scope not in SCOPES:
            raise HetMoEError(f"unknown scope '{self.scope}'; use one of {', '.join(SCOPES)}")
        if self.dense not in DEVICES:
            raise HetMoEError(f"unknown dense placement '{self.dense}'; use one of {', '.join(DEVICES)}")
        for key, device in self.overrides.items():
            parse_override_key(key)
            if device not in DEVICES:
                raise HetMoEError(f"override {key}={device}: device must be one of {', '.join(DEVICES)}")
        if self.digital_memory_budget is not None and self.energy_budget is not None:
            raise HetMoEError("give one budget: --digital-memory-budget or --energy-budget, not both")
        for name, value in (
            ("digital memory budget", self.digital_memory_budget),
            ("energy budget", self.energy_budget),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf")
            ):
                raise HetMoEError(f"{name} must be a finite number > 0, got {value!r}")
        if self.digital_memory_budget is not None:
            self.digital_memory_budget = int(self.digital_memory_budget)
        if self.energy_budget is not None:
            self.energy_budget = float(self.energy_budget)

    def to_dict(self) -> dict:
        """The policy's fields; budgets only when set (so budget-free placements read as before)."""
        d = asdict(self)
        for key in ("digital_memory_budget", "energy_budget"):
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> PlacementPolicy:
        return cls(**data)


def parse_override_key(key: str) -> tuple[int, int]:
    """``"3:17"`` -> (layer 3, expert 17)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", key)
    if not m:
        raise HetMoEError(f"override '{key}': expected LAYER:EXPERT=DEVICE, e.g. 0:5=digital")
    return int(m.group(1)), int(m.group(2))


def parse_override(text: str) -> tuple[str, str]:
    """``"0:5=digital"`` -> ("0:5", "digital"), validated."""
    if "=" not in text:
        raise HetMoEError(f"override '{text}': expected LAYER:EXPERT=DEVICE, e.g. 0:5=digital")
    key, device = (s.strip() for s in text.split("=", 1))
    layer, expert = parse_override_key(key)
    if device not in DEVICES:
        raise HetMoEError(f"override '{text}': device must be one of {', '.join(DEVICES)}")
    return f"{layer}:{expert}", device
