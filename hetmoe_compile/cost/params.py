"""Cost-model parameters: per-operation energy and bandwidth of the digital accelerator, of the AIMC tiles and of
the link between them, and the workload (batch, context). Every default is a published figure (:data:`SOURCES`);
a JSON or TOML file overrides any of them (:func:`load_cost_params`). Imports without torch."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import tomllib

from ..base.errors import HetMoEError

_LE_GALLO = (
    "Le Gallo et al., 'A 64-core mixed-signal in-memory compute chip based on phase-change memory for deep "
    "neural network inference', Nature Electronics 6, 680-693 (2023)"
)
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM)"

SOURCES: dict[str, str] = {
    "digital_macs_per_s": f"{_H100}: 989.4 TFLOPS dense BF16 = 494.7e12 MAC/s",
    "digital_bytes_per_s": f"{_H100}: 3.35 TB/s HBM3",
    "digital_mac_energy_j": "Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014: "
    "16-bit float add 0.4 pJ + multiply 1.1 pJ (45 nm) = 1.5 pJ per MAC",
    "digital_byte_energy_j": "O'Connor et al., 'Fine-grained DRAM: energy-efficient DRAM for extreme bandwidth "
    "systems', MICRO 2017: 3.9 pJ/bit HBM2 access = 31.2 pJ per byte",
    "analog_mac_energy_j": f"{_LE_GALLO}: 9.76 TOPS/W at 8-bit input/output (one-phase read), converters included; "
    "2 ops per MAC = 0.205 pJ per MAC, charged per mapped tile cell",
    "analog_mvm_latency_s": f"{_LE_GALLO}: 63.1 TOPS over 64 cores of 256x256 = 133 ns per MVM",
    "analog_tile_size": "unset: the simulator's AnalogConfig.tile_size (512, aihwkit StandardHWATrainingPreset)",
    "link_bit_energy_j": "Poulton et al., 'A 0.54 pJ/b 20 Gb/s ground-referenced single-ended short-reach serial "
    "link in 28 nm CMOS for advanced packaging applications', IEEE JSSC 48(12), 2013",
    "link_bytes_per_s": f"{_H100}: NVLink 4, 900 GB/s",
    "activation_bits": "assumption: activations cross the digital<->analog link as 16-bit values (bf16/fp16)",
    "batch_size": "workload: tokens that share one fetch of the weights (1 = single-stream decode)",
    "context_length": "workload: tokens attended per decode step (attention-score MACs and KV-cache reads)",
    "weight_bytes": "unset: the element size of the loaded model's dtype (weights and KV cache)",
    "digital_bits": "unset: digital experts in the model dtype; 4 or 8: group-wise INT4/INT8 as --digital-bits "
    "(bits/8 bytes per weight + one model-dtype scale per group)",
    "group_size": "inputs per quantisation group with digital_bits, as --group-size",
}

UNITS: dict[str, str] = {
    "digital_macs_per_s": "MAC/s",
    "digital_bytes_per_s": "B/s",
    "digital_mac_energy_j": "J/MAC",
    "digital_byte_energy_j": "J/B",
    "analog_mac_energy_j": "J/MAC",
    "analog_mvm_latency_s": "s",
    "analog_tile_size": "cells a side",
    "link_bit_energy_j": "J/bit",
    "link_bytes_per_s": "B/s",
    "activation_bits": "bits",
    "batch_size": "tokens",
    "context_length": "tokens",
    "weight_bytes": "B",
    "digital_bits": "bits",
    "group_size": "inputs",
}

_INTS = ("analog_tile_size", "activation_bits", "batch_size", "context_length", "digital_bits", "group_size")
_OPTIONAL = ("analog_tile_size", "weight_bytes", "digital_bits")


@dataclass(frozen=True)
class CostParams:
    """Per-operation costs and the workload; see :data:`SOURCES` for where each default comes from."""

    digital_macs_per_s: float = 494.7e12
    digital_bytes_per_s: float = 3.35e12
    digital_mac_energy_j: float = 1.5e-12
    digital_byte_energy_j: float = 31.2e-12
    analog_mac_energy_j: float = 0.205e-12
    analog_mvm_latency_s: float = 133e-9
    analog_tile_size: int | None = None
    link_bit_energy_j: float = 0.54e-12
    link_bytes_per_s: float = 900e9
    activation_bits: int = 16
    batch_size: int = 1
    context_length: int = 2048
    weight_bytes: float | None = None
    digital_bits: int | None = None
    group_size: int = 128

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HetMoEError(f"cost parameter {f.name} must be a number, got {value!r}")
            if value <= 0:
                raise HetMoEError(
                    f"cost parameter {f.name} must be > 0, got {value}; the default is "
                    f"{getattr(CostParams, f.name)} ({SOURCES[f.name]})"
                )
            if f.name in _INTS and value != int(value):
                raise HetMoEError(f"cost parameter {f.name} must be an integer, got {value}")
        if self.digital_bits is not None and self.digital_bits not in (4, 8):
            raise HetMoEError(f"cost parameter digital_bits must be 4 or 8 (or unset), got {self.digital_bits}")

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> CostParams:
        """A copy with ``changes``; ``None`` values are ignored (keep the current value)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def for_tiles(self, tile_size: int) -> CostParams:
        """These parameters with the simulator's tile size (``AnalogConfig.tile_size``) unless they set one."""
        return self if self.analog_tile_size is not None else self.replace(analog_tile_size=tile_size)

    @classmethod
    def from_dict(cls, data: dict, source: str = "cost config") -> CostParams:
        if not isinstance(data, dict):
            raise HetMoEError(f"{source}: expected a table of cost parameters, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise HetMoEError(
                f"{source}: unknown cost parameter(s) {', '.join(unknown)}; valid keys: {', '.join(known)}"
            )
        try:
            return cls(**data)
        except HetMoEError as exc:
            raise HetMoEError(f"{source}: {exc}") from None


def load_cost_params(path: str | Path | None = None, **overrides) -> CostParams:
    """The defaults, changed by the JSON or TOML file ``path`` (by suffix; ``.toml`` is TOML, anything else JSON)
    and then by the non-``None`` ``overrides``."""
    params = CostParams()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HetMoEError(f"{path}: cost config file not found; pass a JSON or TOML file to --cost-config")
        text = path.read_text(encoding="utf-8")
        try:
            data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except json.JSONDecodeError as exc:
            raise HetMoEError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); name a TOML file *.toml"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise HetMoEError(f"{path}: not valid TOML ({exc})") from None
        params = CostParams.from_dict(data, str(path))
    return params.replace(**overrides)


def describe_params(params: CostParams | None = None) -> str:
    """One line per parameter: name, value, unit and source (for ``--help`` and the docs)."""
    params = params or CostParams()
    lines = []
    for f in fields(params):
        value = getattr(params, f.name)
        shown = "unset" if value is None else f"{value:g} {UNITS[f.name]}"
        lines.append(f"  {f.name} = {shown}: {SOURCES[f.name]}")
    return "\n".join(lines)
