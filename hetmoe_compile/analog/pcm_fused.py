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
        from ..base.errors import HetMoEError

        raise HetMoEError("PCM noise needs aihwkit: pip install --no-deps aihwkit==1.1.0 (see the README)") from exc

    return PCMLikeNoiseModel(prog_noise_scale=noise_scale)


class _Normals:
    """Standard normals for a stack of matrices, one seeded generator per matrix, drawn one ``[E, *shape]`` field
    at a time (a matrix's draws depend only on its seed; on the CPU the stream equals one ``randn((5, *shape))``
    draw per matrix whenever the matrix has a multiple of 16 elements)."""

    def __init__(self, shape: tuple[int, ...], seeds: list[int], device: torch.device) -> None:
        self.shape, self.device = shape, device
        self.gens = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def draw(self) -> torch.Tensor:
        out = torch.empty((len(self.gens), *self.shape), device=self.device)
        for e, gen in enumerate(self.gens):
            torch.randn(self.shape, generator=gen, device=self.device, out=out[e])
        return out


def _mu_sd(g_rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """aihwkit's drift-coefficient mean and spread for relative conductances."""
    log_g = torch.log(g_rel.clamp(min=_ZERO_CLIP))
    return (-0.0155 * log_g + 0.0244).clamp_(0.049, 0.1), (-0.0125 * log_g - 0.0059).clamp_(0.008, 0.045)


_ZERO_CLIP = 1e-7
CHUNK_ELEMENTS = 1 << 21  # matrices are processed in groups of about this many weights (bounded temporaries)


def pcm_program(
    target: torch.Tensor, seeds: list[int], noise_scale: float, programming: bool, drift: bool, t_inference: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Programmed (and drifted) weights of the stack ``target [E, ...]`` plus the programmed-but-not-drifted
    weights (the drift-compensation baseline). ``seeds[e]`` drives matrix ``e``.

    With a single device pair per weight one device holds ``|w|`` and the other sits at 0, so the zero device's
    terms are closed-form (its drift coefficient clamps to aihwkit's bounds: mean 0.1, spread 0.045) and only the
    device that conducts after programming drifts and carries read noise: aihwkit's arithmetic, about half of it.
    """
    per = max(1, CHUNK_ELEMENTS // max(1, target[0].numel()))
    outs = [
        _program_chunk(target[i : i + per], seeds[i : i + per], noise_scale, programming, drift, t_inference)
        for i in range(0, target.shape[0], per)
    ]
    if len(outs) == 1:
        return outs[0]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _program_chunk(target, seeds, noise_scale, programming, drift, t_inference):
    """One chunk, arranged so that few temporaries of the chunk's size are alive at once (in-place steps, each
    normal field drawn when it is used); the arithmetic is the reference's, operation for operation."""
    model = _noise_model(noise_scale)
    g_max = model.g_max
    dims = tuple(range(1, target.dim()))
    normals = _Normals(tuple(target.shape[1:]), seeds, target.device)
    negative = target < 0
    ratio = g_max / target.abs().amax(dim=dims, keepdim=True).clamp(min=_ZERO_CLIP)
    g = target.abs().mul_(ratio).clamp_(max=g_max)  # the conducting device; its partner is at 0
    if programming:
        c = model.prog_coeff
        ref = (g_max / model.prog_coeff_g_max_reference) * model.prog_noise_scale
        sig = (g / g_max).mul_(c[2]).add_(c[1]).mul_(g / g_max).add_(c[0]).mul_(ref)
        diff = normals.draw().mul_(sig).add_(g).clamp_(min=0.0)  # conducting device
        del sig
        diff.sub_(normals.draw().mul_(c[0] * ref).clamp_(min=0.0))  # minus its partner
    else:
        normals.draw(), normals.draw()  # the programming fields: drift draws the same fields with or without them
        diff = g.clone()
    programmed = torch.where(negative, -diff, diff).div_(ratio)
    del negative
    if not drift:
        return programmed, programmed
    mu, sd = _mu_sd(g / g_max)
    del g
    nu = normals.draw().mul_(sd).add_(mu).abs_()  # the original device's drift coefficient
    del mu, sd
    nu_zero = normals.draw().mul_(0.045).add_(0.1).abs_()
    # after programming, the conducting device is the original one where the weight kept its sign
    nu = torch.where(diff >= 0, nu, nu_zero).mul_(model.drift_scale)
    del nu_zero, diff
    ratio2 = g_max / programmed.abs().amax(dim=dims, keepdim=True).clamp(min=_ZERO_CLIP)
    h = programmed.abs().mul_(ratio2).clamp_(max=g_max)
    t = t_inference + model.t_0
    drifted = nu.mul_(-math.log(t / model.t_0)).exp_().mul_(h) if t > model.t_0 else h
    del nu
    q_s = (0.0088 / (h / g_max).clamp_(min=1e-30).log_().mul_(0.65).exp_().clamp_(min=1e-3)).clamp_(max=0.2)
    del h
    sig_noise = math.sqrt(math.log((t + model.t_read) / (2 * model.t_read))) * model.read_noise_scale
    final = q_s.mul_(sig_noise).mul_(drifted).mul_(normals.draw()).add_(drifted).clamp_(min=0.0)
    del drifted
    return final.copysign_(programmed).div_(ratio2), programmed
