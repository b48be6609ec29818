"""Analog (AIMC) hardware configuration and its presets.

Sources: the ``pcm`` periphery follows aihwkit's ``StandardHWATrainingPreset`` (8-bit DAC and ADC, ``inp_res =
out_res = 1/254``, output noise 0.04, output bound 10, per-column weight scaling, 512x512 tiles,
``PCMLikeNoiseModel``, ``GlobalDriftCompensation``) without its read noise and IR drop, and with abs-max noise
management instead of calibrated input ranges: the setting the paper used (8-bit converters, 512x512 tiles, PCM
programming noise). ``standard-hwa`` is aihwkit's preset in full (``w_noise`` 0.0175 ``PCM_READ``, IR drop 1,
constant noise management with input ranges calibrated on text); its tiles also split the outputs at 512, where
aihwkit's preset leaves them whole (``max_output_size=0``), which changes only the global drift compensation's
grouping.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace

from ..base.errors import HetMoEError

W_NOISE_TYPES = ("pcm-read", "additive")
DRIFT_COMPENSATIONS = ("global", "per-column")
BOUND_MANAGEMENTS = ("none", "iterative")
NOISE_MANAGEMENTS = ("abs-max", "constant")


@dataclass(frozen=True)
class AnalogConfig:
    """What the simulated AIMC tiles do. ``noise_scale`` multiplies the weight noise (PCM programming noise, or
    the Gaussian sigma); the paper used 1.5 and 2.5. ``w_noise`` is aihwkit's short-term weight (read) noise,
    drawn anew at every MVM (``w_noise_type`` ``pcm-read``: std ``w_noise * sqrt(sum_j |w_ij| x_j^2)``, aihwkit's
    ``PCM_READ``; ``additive``: ``w_noise * ||x||``, its ``ADDITIVE_CONSTANT``); ``ir_drop`` scales aihwkit's
    input-dependent IR drop along each tile's inputs, ``ir_drop_g_ratio`` being its wire-to-device conductance
    ratio (aihwkit's default: 0.35 Ohm wires, 5 uS devices). ``drift_compensation_type`` ``global``: one factor
    per tile (aihwkit's ``GlobalDriftCompensation``); ``per-column``: one per output of each tile (its
    ``PerColumnDriftCompensation``). ``bound_management`` ``iterative``: aihwkit's iterative bound management, a
    tile whose output saturates the ADC re-run with its input halved until it does not. ``noise_management``
    ``abs-max``: each input vector scaled by its abs-max per tile (aihwkit's ``ABS_MAX``); ``constant``: by a fixed
    input range per (matrix, input tile) calibrated on text (its ``CONSTANT`` with ``pre_post.input_range``; the
    ranges come from :func:`~.input_ranges.calibrate_input_ranges`)."""

    preset: str = "pcm"
    device: str = "pcm"
    programming_noise: bool = True
    drift: bool = True
    drift_compensation: bool = True
    drift_compensation_type: str = "global"
    noise_scale: float = 1.0
    t_inference: float = 3600.0
    gaussian_sigma: float = 0.0
    dac_bits: int = 8
    adc_bits: int = 8
    out_noise: float = 0.04
    out_bound: float = 10.0
    tile_size: int = 512
    w_noise: float = 0.0
    w_noise_type: str = "pcm-read"
    ir_drop: float = 0.0
    ir_drop_g_ratio: float = 1.0 / 0.35 / 5e-6
    bound_management: str = "none"
    noise_management: str = "abs-max"

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            if kind in ("float", "int") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise HetMoEError(f"analog config {f.name}={value!r} must be a number")
            if kind == "int" and not isinstance(value, int):
                raise HetMoEError(f"analog config {f.name}={value!r} must be an integer")
            if kind == "float" and not math.isfinite(value):
                raise HetMoEError(f"analog config {f.name}={value!r} must be a finite number")
            if kind == "bool" and not isinstance(value, bool):
                raise HetMoEError(f"analog config {f.name}={value!r} must be true or false")
            if kind == "str" and not isinstance(value, str):
                raise HetMoEError(f"analog config {f.name}={value!r} must be a string")
        if self.noise_scale < 0:
            raise HetMoEError(f"noise scale must be >= 0, got {self.noise_scale}")
        if not self.t_inference > 0:
            raise HetMoEError(f"t_inference must be > 0 seconds, got {self.t_inference}; the default is 3600")
        if self.gaussian_sigma < 0 or self.out_noise < 0 or self.out_bound <= 0:
            raise HetMoEError("gaussian_sigma and out_noise must be >= 0 and out_bound > 0")
        if self.w_noise < 0 or self.ir_drop < 0 or self.ir_drop_g_ratio <= 0:
            raise HetMoEError(
                f"w_noise and ir_drop must be >= 0 and ir_drop_g_ratio > 0, got {self.w_noise}, {self.ir_drop}, "
                f"{self.ir_drop_g_ratio}"
            )
        from .device_models import DEVICES, check_device_time

        if self.device not in DEVICES:
            raise HetMoEError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check_device_time(self.device, self.drift, self.t_inference)
        if self.drift_compensation_type not in DRIFT_COMPENSATIONS:
            raise HetMoEError(
                f"drift_compensation_type must be one of {', '.join(DRIFT_COMPENSATIONS)}, got "
                f"{self.drift_compensation_type!r}"
            )
        if self.bound_management not in BOUND_MANAGEMENTS:
            raise HetMoEError(
                f"bound_management must be one of {', '.join(BOUND_MANAGEMENTS)}, got {self.bound_management!r}"
            )
        if self.noise_management not in NOISE_MANAGEMENTS:
            raise HetMoEError(
                f"noise_management must be one of {', '.join(NOISE_MANAGEMENTS)}, got {self.noise_management!r}"
            )
        if self.w_noise_type not in W_NOISE_TYPES:
            raise HetMoEError(f"w_noise_type must be one of {', '.join(W_NOISE_TYPES)}, got {self.w_noise_type!r}")
        for name in ("dac_bits", "adc_bits"):
            bits = getattr(self, name)
            if bits != 0 and not 2 <= bits <= 24:
                raise HetMoEError(f"{name} must be 0 (no quantisation) or in 2..24, got {bits}")
        if self.tile_size < 1:
            raise HetMoEError(f"tile_size must be >= 1, got {self.tile_size}")

    @property
    def is_ideal(self) -> bool:
        """No noise and no quantisation: the analog op equals the digital one."""
        return (
            not self.programming_noise
            and not self.drift
            and self.gaussian_sigma == 0
            and self.dac_bits == 0
            and self.adc_bits == 0
            and self.out_noise == 0
            and self.w_noise == 0
            and self.ir_drop == 0
            and self.noise_management == "abs-max"  # calibrated ranges clip inputs
        )

    @property
    def inp_res(self) -> float:
        """DAC step in units of the input bound (aihwkit's ``inp_res``); 0 = no quantisation."""
        return 1.0 / (2**self.dac_bits - 2) if self.dac_bits else 0.0

    @property
    def out_res(self) -> float:
        return 1.0 / (2**self.adc_bits - 2) if self.adc_bits else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> AnalogConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise HetMoEError(f"unknown analog config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> AnalogConfig:
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, AnalogConfig] = {
    "pcm": AnalogConfig(),
    "dac-adc": AnalogConfig(preset="dac-adc", programming_noise=False, drift=False, drift_compensation=False),
    "gaussian": AnalogConfig(
        preset="gaussian",
        programming_noise=False,
        drift=False,
        drift_compensation=False,
        gaussian_sigma=0.05,
        dac_bits=0,
        adc_bits=0,
        out_noise=0.0,
    ),
    "standard-hwa": AnalogConfig(
        preset="standard-hwa", w_noise=0.0175, w_noise_type="pcm-read", ir_drop=1.0, noise_management="constant"
    ),
    "reram-wan2022": AnalogConfig(preset="reram-wan2022", device="reram-wan2022", t_inference=86400.0),
    "reram-cmo": AnalogConfig(preset="reram-cmo", device="reram-cmo"),
    "hermes-pcm": AnalogConfig(preset="hermes-pcm", device="hermes-pcm"),
    "ideal": AnalogConfig(
        preset="ideal",
        programming_noise=False,
        drift=False,
        drift_compensation=False,
        dac_bits=0,
        adc_bits=0,
        out_noise=0.0,
    ),
}


def analog_config(
    preset: str = "pcm", noise_scale: float | None = None, t_inference: float | None = None, **overrides
) -> AnalogConfig:
    """A preset, optionally with ``noise_scale``, ``t_inference`` or any other field changed."""
    if preset not in PRESETS:
        raise HetMoEError(f"unknown noise preset '{preset}'; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(AnalogConfig)} - {"preset"})
    if unknown:
        names = ", ".join(f.name for f in fields(AnalogConfig) if f.name != "preset")
        raise HetMoEError(f"analog_config: unknown field(s) {', '.join(unknown)}; the fields are {names}")
    changes = dict(overrides)
    if noise_scale is not None:
        changes["noise_scale"] = float(noise_scale)
    if t_inference is not None:
        changes["t_inference"] = float(t_inference)
    return replace(PRESETS[preset], **changes)
