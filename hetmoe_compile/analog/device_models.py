"""Devices other than aihwkit's ``PCMLikeNoiseModel`` (which :mod:`.pcm_fused` programs): ReRAM after Wan et al.
2022, IBM's CMO/HfOx ReRAM, and the PCM of IBM's HERMES chip, for many matrices at once.

The equations are aihwkit's (``aihwkit.inference.noise.reram.ReRamWan2022NoiseModel``, ``ReRamCMONoiseModel``,
``aihwkit.inference.noise.hermes.HermesNoiseModel`` with their default conductance converters), and every
coefficient is read from an aihwkit model object. As in aihwkit's tiles, weights are programmed at t = 0
(``apply_programming_noise``), then converted to conductances again and drifted to ``t_inference``
(``apply_drift_noise`` with the drift parameters drawn at programming). What differs is the arrangement: one
pass over a stack ``[E, ...]`` of matrices, each matrix converted on its own scale and its normals drawn from its
own seeded generator, so a matrix's devices depend only on its seed. ``tests/test_analog.py`` checks the
statistics against aihwkit's own functions.
"""

from __future__ import annotations

import math

import torch

from ..base.errors import HetMoEError
from .pcm_fused import CHUNK_ELEMENTS, _Normals

DEVICES = ("pcm", "reram-wan2022", "reram-cmo", "hermes-pcm")
WAN2022_TIMES = (1.0, 86400.0, 172800.0)
"""The only times since programming that aihwkit's ReRAM (Wan 2022) model has fits for."""


def noise_model(device: str, noise_scale: float):
    """aihwkit's noise model object of ``device`` with its programming noise scaled by ``noise_scale``."""
    try:
        from aihwkit.inference.noise.hermes import HermesNoiseModel
        from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
        from aihwkit.inference.noise.reram import ReRamCMONoiseModel, ReRamWan2022NoiseModel
    except ImportError as exc:  # pragma: no cover - aihwkit is installed by `make install`
        raise HetMoEError("device noise needs aihwkit: pip install --no-deps aihwkit==1.1.0 (see the README)") from exc
    if device == "pcm":
        return PCMLikeNoiseModel(prog_noise_scale=noise_scale)
    if device == "reram-wan2022":
        return ReRamWan2022NoiseModel(noise_scale=noise_scale)
    if device == "reram-cmo":
        return ReRamCMONoiseModel(prog_noise_scale=noise_scale)
    if device == "hermes-pcm":
        return HermesNoiseModel(prog_noise_scale=noise_scale)
    raise HetMoEError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")


def check_device_time(device: str, drift: bool, t_inference: float) -> None:
    """One line when ``device`` has no fit at ``t_inference`` (aihwkit's Wan 2022 ReRAM: 1 s, 1 day, 2 days)."""
    if device == "reram-wan2022" and drift and t_inference not in WAN2022_TIMES:
        raise HetMoEError(
            f"t_inference {t_inference:g} s: the reram-wan2022 device is characterised at 1, 86400 and 172800 s only "
            "(aihwkit's ReRamWan2022NoiseModel); choose one of those"
        )


def device_program(
    target: torch.Tensor,
    seeds: list[int],
    device: str,
    noise_scale: float,
    programming: bool,
    drift: bool,
    t_inference: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Programmed (and drifted) weights of the stack ``target [E, ...]`` plus the programmed-but-not-drifted
    weights (the drift-compensation baseline); ``seeds[e]`` drives matrix ``e``. ``programming=False`` leaves the
    programming noise out (its normals are still drawn, so the drift draws do not move)."""
    t = t_inference
    check_device_time(device, drift, t)
    per = max(1, CHUNK_ELEMENTS // max(1, target[0].numel()))
    step = {"reram-wan2022": _wan2022, "reram-cmo": _cmo, "hermes-pcm": _hermes}[device]
    model = noise_model(device, noise_scale)
    outs = []
    for i in range(0, target.shape[0], per):
        normals = _Normals(tuple(target.shape[1:]), seeds[i : i + per], target.device)
        outs.append(step(model, target[i : i + per], normals, programming, drift, t))
    if len(outs) == 1:
        return outs[0]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _dims(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


def _pair(w: torch.Tensor, g_max: float, g_min: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """aihwkit's ``SinglePairConductanceConverter`` per matrix: ``(g_plus, g_minus, ratio)``."""
    ratio = (g_max - g_min) / w.abs().amax(dim=_dims(w), keepdim=True).clamp(min=1e-7)
    scaled = w * ratio
    return scaled.clamp(0.0, g_max) + g_min, (-scaled).clamp(0.0, g_max) + g_min, ratio


def _unpair(g_plus: torch.Tensor, g_minus: torch.Tensor, g_min: float, ratio: torch.Tensor) -> torch.Tensor:
    return ((g_plus - g_min) - (g_minus - g_min)) / ratio


def _poly(g: torch.Tensor, coeff: list[float], g_max: float) -> torch.Tensor:
    """``sum_i c_i (g / g_max)^i`` (aihwkit's ``_apply_poly`` and Hermes' programming polynomial)."""
    out = torch.full_like(g, float(coeff[0]))
    power = torch.ones_like(g)
    for c in coeff[1:]:
        power = power * (g / g_max)
        out = out + power * c
    return out


def _wan2022(model, target, normals, programming, drift, t):
    """``ReRamWan2022NoiseModel``: programming noise from the 1 s fit; at ``t`` the conductances are re-drawn
    around the *targets* from that time's fit (its drift "coefficients" are the targets)."""
    g_max, g_min = model.g_max, model.g_converter.g_min
    scale = model.g_max / model.coeff_g_max_reference
    coeffs = model.coeff_dic
    first = coeffs[min(coeffs)]
    targets = _pair(target, g_max, g_min)
    progs = []
    for g in targets[:2]:
        noise = normals.draw()
        progs.append(
            (g + model.noise_scale * _poly(g, first, g_max) * scale * noise).clamp_(min=0.0) if programming else g
        )
    programmed = _unpair(progs[0], progs[1], g_min, targets[2])
    if not drift:
        return programmed, programmed
    _, _, ratio2 = _pair(programmed, g_max, g_min)
    finals = [
        (g + model.noise_scale * _poly(g, coeffs[t], g_max) * scale * normals.draw()).clamp_(min=0.0)
        for g in targets[:2]
    ]
    return _unpair(finals[0], finals[1], g_min, ratio2), programmed


def _cmo(model, target, normals, programming, drift, t):
    """``ReRamCMONoiseModel`` on one device per weight (``SingleDeviceConductanceConverter``: the matrix's
    [min, max] onto [g_min, g_max]): linear programming noise, log-time relaxation of mean and spread, 1/f read
    noise, clipped to [g_min, g_max]."""
    g_max, g_min = model.g_max, model.g_min
    dims = _dims(target)

    def convert(w):
        lo, hi = w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)
        ratio = (g_max - g_min) / (hi - lo)
        return (w - lo) * ratio + g_min, lo, ratio

    g, lo, ratio = convert(target)
    key = model.acceptance_range if model.acceptance_range in model.coeff_dict else min(model.coeff_dict)
    coeff = model.coeff_dict[key]
    noise = normals.draw()
    if programming:
        sig = torch.full_like(g, float(coeff[0]))
        power = torch.ones_like(g)
        for c in coeff[1:]:
            power = power * g
            sig = sig + power * c
        g = g + sig * (model.g_max / model.coeff_g_max_reference) * noise * model.prog_noise_scale
    programmed = lo + (g - g_min) / ratio
    if not drift or t == 0:
        return programmed, programmed
    h, lo2, ratio2 = convert(programmed)
    log_t = math.log(t)
    mean = h + model.decay_dict["mean"][0] * log_t * model.drift_scale
    relax = model.decay_dict["std"][0] * log_t + model.decay_dict["std"][1]
    drifted = mean + normals.draw() * relax * model.drift_scale
    k, t_read = model.read_dict["K"], model.read_dict["t_read"]
    sig_read = k * torch.log10(drifted) * math.sqrt(math.log((t + t_read) / (2 * t_read)))
    final = (drifted + sig_read * normals.draw() * model.read_noise_scale).clamp_(min=g_min, max=g_max)
    return lo2 + (final - g_min) / ratio2, programmed


def _hermes(model, target, normals, programming, drift, t):
    """``HermesNoiseModel`` (its default: two devices per weight): cubic programming noise, conductance-dependent
    drift coefficients (branch fits), power-law drift from ``t_0``, conductance-dependent 1/f read noise."""
    if model.num_devices != 2:  # pragma: no cover - the preset uses aihwkit's default
        raise HetMoEError("hermes-pcm is modelled with aihwkit's default of two devices per weight")
    g_max, g_min = model.g_max, model.g_converter.g_min
    scale = model.g_max / model.prog_coeff_g_max_reference
    targets = _pair(target, g_max, g_min)
    progs, nus = [], []
    for g in targets[:2]:
        noise = normals.draw()
        progs.append(
            (g + model.prog_noise_scale * _poly(g, model.prog_coeff, g_max) * scale * noise).clamp_(min=0.0)
            if programming
            else g
        )
        rel = (g / g_max).abs().clamp(min=1e-7)
        mu = torch.where(
            rel < 0.0945,
            (-0.0387 * torch.log(rel) - 0.0182).clamp(0.0720, 0.13),
            -0.0436 * rel**2 - 0.0126 * rel + 0.0736,
        )
        sd = torch.where(
            rel < 0.3055,
            (-0.0117 * torch.log(rel) - 0.0057).clamp(0.0091, 0.04),
            -0.0118 * rel**2 + 0.0093 * rel + 0.0073,
        )
        nus.append((mu + sd * normals.draw()).abs().clamp(min=0.0) * model.drift_scale)
    programmed = _unpair(progs[0], progs[1], g_min, targets[2])
    if not drift:
        return programmed, programmed
    h_plus, h_minus, ratio2 = _pair(programmed, g_max, g_min)
    total = t + model.t_0
    finals = []
    for h, nu in zip((h_plus, h_minus), nus):
        g_drift = h * (total / model.t_0) ** (-nu) if total > model.t_0 else h
        rel = h.abs() / g_max
        q_s = torch.where(
            rel < 0.16,
            (-0.0117 * torch.log(rel) - 0.0069).clamp(0.015, 0.04),
            0.0069 * rel**3 - 0.0280 * rel**2 + 0.0211 * rel + 0.0123,
        )
        sig = q_s * math.sqrt(math.log((total + model.t_read) / (2 * model.t_read)))
        finals.append((g_drift + g_drift.abs() * model.read_noise_scale * sig * normals.draw()).clamp_(min=0.0))
    return _unpair(finals[0], finals[1], g_min, ratio2), programmed
