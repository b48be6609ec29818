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
    try:
        from aihwkit.inference import PCMLikeNoiseModel
    except ImportError as exc:  # pragma: no cover - aihwkit is installed by `make install`
        from ..errors import HetMoEError

        raise HetMoEError(
            "PCM noise needs aihwkit: pip install --no-deps aihwkit==1.1.0 (see the README)"
        ) from exc

    return PCMLikeNoiseModel(prog_noise_scale=noise_scale)


def _normals(shape: tuple[int, ...], seeds: list[int], count: int, device: torch.device) -> torch.Tensor:
    """``[count, E, *shape]`` standard normals; matrix ``e`` uses only ``seeds[e]``."""
    out = torch.empty((len(seeds), count, *shape), device=device)
    for e, seed in enumerate(seeds):
        gen = torch.Generator(device=device).manual_seed(int(seed))
        torch.randn((count, *shape), generator=gen, device=device, out=out[e])
    return out.transpose(0, 1)


def _mu_sd(g_rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """aihwkit's drift-coefficient mean and spread for relative conductances."""
    log_g = torch.log(g_rel.clamp(min=_ZERO_CLIP))
    return (-0.0155 * log_g + 0.0244).clamp_(0.049, 0.1), (-0.0125 * log_g - 0.0059).clamp_(0.008, 0.045)


_ZERO_CLIP = 1e-7
CHUNK_ELEMENTS = 1 << 22  # matrices are processed in groups of about this many weights (bounded temporaries)


def pcm_program(target: torch.Tensor, seeds: list[int], noise_scale: float, programming: bool, drift: bool,
                t_inference: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Programmed (and drifted) weights of the stack ``target [E, ...]`` plus the programmed-but-not-drifted
    weights (the drift-compensation baseline). ``seeds[e]`` drives matrix ``e``.

    With a single device pair per weight one device holds ``|w|`` and the other sits at 0, so the zero device's
    terms are closed-form (its drift coefficient clamps to aihwkit's bounds: mean 0.1, spread 0.045) and only the
    device that conducts after programming drifts and carries read noise: aihwkit's arithmetic, about half of it.
    """
    per = max(1, CHUNK_ELEMENTS // max(1, target[0].numel()))
    outs = [_program_chunk(target[i : i + per], seeds[i : i + per], noise_scale, programming, drift, t_inference)
            for i in range(0, target.shape[0], per)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _program_chunk(target, seeds, noise_scale, programming, drift, t_inference):
    model = _noise_model(noise_scale)
    g_max = model.g_max
    dims = tuple(range(1, target.dim()))
    z = _normals(tuple(target.shape[1:]), seeds, 5, target.device)
    sign = torch.where(target < 0, -1.0, 1.0)
    ratio = g_max / target.abs().amax(dim=dims, keepdim=True).clamp(min=_ZERO_CLIP)
    g = (target.abs() * ratio).clamp_(max=g_max)  # the conducting device; its partner is at 0
    if programming:
        c = model.prog_coeff
        ref = (g_max / model.prog_coeff_g_max_reference) * model.prog_noise_scale
        rel = g / g_max
        sig = (c[0] + (c[1] + c[2] * rel) * rel) * ref
        main = (g + sig * z[0]).clamp_(min=0.0)
        zero = (c[0] * ref * z[1]).clamp_(min=0.0)
        diff = main - zero  # conducting minus partner
    else:
        diff = g
    programmed = sign * diff / ratio
    if not drift:
        return programmed, programmed
    mu, sd = _mu_sd(g / g_max)
    nu_main = (mu + sd * z[2]).abs_()
    nu_zero = (0.1 + 0.045 * z[3]).abs_()
    # after programming, the conducting device is the original one where the weight kept its sign
    nu = torch.where(diff >= 0, nu_main, nu_zero) * model.drift_scale
    ratio2 = g_max / programmed.abs().amax(dim=dims, keepdim=True).clamp(min=_ZERO_CLIP)
    h = (programmed.abs() * ratio2).clamp_(max=g_max)
    t = t_inference + model.t_0
    drifted = h * torch.exp(-nu * math.log(t / model.t_0)) if t > model.t_0 else h
    q_s = (0.0088 / torch.exp(0.65 * torch.log((h / g_max).clamp(min=1e-30))).clamp_(min=1e-3)).clamp_(max=0.2)
    sig_noise = math.sqrt(math.log((t + model.t_read) / (2 * model.t_read))) * model.read_noise_scale
    final = (drifted + drifted * (sig_noise * q_s) * z[4]).clamp_(min=0.0)
    return torch.where(programmed < 0, -final, final) / ratio2, programmed
