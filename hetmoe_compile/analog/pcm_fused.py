"""PCM programming, drift and read noise for many matrices at once.

The equations are aihwkit's ``PCMLikeNoiseModel`` with ``SinglePairConductanceConverter`` (programming noise
polynomial, drift coefficients, drift to ``t_inference`` with accumulated 1/f read noise, conductances re-derived
from the programmed weights before drifting), and every coefficient is read from an aihwkit model object. What
differs is the arrangement: one pass over a stack ``[E, ...]`` of matrices instead of one aihwkit call per
matrix, with each matrix's normals drawn from its own seeded generator, so a matrix's devices depend only on its
seed. ``tests/test_analog.py`` checks the statistics against aihwkit's own functions.
"""
from __future__ import annotations

import math

import torch


def _noise_model(noise_scale: float):
    from aihwkit.inference import PCMLikeNoiseModel

    return PCMLikeNoiseModel(prog_noise_scale=noise_scale)


def _normals(shape: tuple[int, ...], seeds: list[int], count: int, device: torch.device) -> torch.Tensor:
    """``[count, E, *shape]`` standard normals; matrix ``e`` uses only ``seeds[e]``."""
    out = torch.empty((len(seeds), count, *shape), device=device)
    for e, seed in enumerate(seeds):
        gen = torch.Generator(device=device).manual_seed(int(seed))
        torch.randn((count, *shape), generator=gen, device=device, out=out[e])
    return out.transpose(0, 1)


def _split(w: torch.Tensor, g_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-pair conductances of each matrix on its own abs-max: ``(g_plus, g_minus, scale_ratio)``."""
    dims = tuple(range(1, w.dim()))
    ratio = g_max / w.abs().amax(dim=dims, keepdim=True).clamp(min=1e-7)
    scaled = w * ratio
    return scaled.clamp(0.0, g_max), (-scaled).clamp(0.0, g_max), ratio


def pcm_program(target: torch.Tensor, seeds: list[int], noise_scale: float, programming: bool, drift: bool,
                t_inference: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Programmed (and drifted) weights of the stack ``target [E, ...]`` plus the programmed-but-not-drifted
    weights (the drift-compensation baseline). ``seeds[e]`` drives matrix ``e``."""
    model = _noise_model(noise_scale)
    g_max = model.g_max
    shape = tuple(target.shape[1:])
    z = _normals(shape, seeds, 6, target.device)
    g_pos, g_neg, ratio = _split(target, g_max)
    pair = torch.stack([g_pos, g_neg])  # [2, E, ...]
    if programming:
        c = model.prog_coeff
        rel = pair / g_max
        sig = (c[0] + c[1] * rel + c[2] * rel * rel) * (g_max / model.prog_coeff_g_max_reference)
        prog = (pair + model.prog_noise_scale * sig * z[0:2]).clamp_(min=0.0)
    else:
        prog = pair
    programmed = (prog[0] - prog[1]) / ratio
    if not drift:
        return programmed, programmed
    g_rel = (pair / g_max).abs().clamp(min=1e-7)
    mu = (-0.0155 * torch.log(g_rel) + 0.0244).clamp(0.049, 0.1)
    sd = (-0.0125 * torch.log(g_rel) - 0.0059).clamp(0.008, 0.045)
    nu = (mu + sd * z[2:4]).abs() * model.drift_scale
    h_pos, h_neg, ratio2 = _split(programmed, g_max)  # aihwkit re-derives conductances from programmed weights
    h = torch.stack([h_pos, h_neg])
    t = t_inference + model.t_0
    drifted = h * (t / model.t_0) ** (-nu) if t > model.t_0 else h
    q_s = (0.0088 / ((h.abs() / g_max) ** 0.65).clamp(min=1e-3)).clamp(max=0.2)
    sig_noise = q_s * math.sqrt(math.log((t + model.t_read) / (2 * model.t_read)))
    final = (drifted + drifted.abs() * model.read_noise_scale * sig_noise * z[4:6]).clamp_(min=0.0)
    return (final[0] - final[1]) / ratio2, programmed
