"""Program weight matrices onto simulated AIMC tiles (vectorised) and run noisy tiled MVMs.

A matrix ``W [out, in]`` is cut into ``ceil(n / tile_size)`` equal column blocks (inputs) and row blocks (outputs), as
aihwkit's ``TileModuleArray`` does. Each row of each tile is mapped to conductances on its own scale (its abs-max:
aihwkit's ``weight_scaling_columnwise``), programmed with the noise model, drifted to ``t_inference`` with read
noise, and compensated by one global factor per tile (aihwkit's ``GlobalDriftCompensation``, using its expected
read-out). The MVM applies noise management (per-token abs-max, or constant with calibrated input ranges) and DAC
quantisation per tile, output noise, ADC quantisation and clipping per tile, and sums the tiles' partial outputs
digitally.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import AnalogConfig


class Periphery(NamedTuple):
    """DAC/ADC, output-noise, short-term weight-noise and IR-drop settings of a tiled MVM (floats, so they can
    travel as custom-op arguments). ``w_noise_pcm`` is 1 for aihwkit's ``PCM_READ`` weight noise, 0 for its
    ``ADDITIVE_CONSTANT``."""

    inp_res: float
    out_res: float
    out_noise: float
    out_bound: float
    w_noise: float = 0.0
    w_noise_pcm: float = 1.0
    ir_drop: float = 0.0
    ir_drop_g_ratio: float = 1.0 / 0.35 / 5e-6
    bound_management: float = 0.0  # 1: aihwkit's ITERATIVE bound management
    max_bm_factor: float = 1000.0
    max_bm_res: float = 0.25

    @classmethod
    def of(cls, cfg: AnalogConfig) -> Periphery:
        return cls(
            cfg.inp_res,
            cfg.out_res,
            cfg.out_noise,
            cfg.out_bound,
            cfg.w_noise,
            1.0 if cfg.w_noise_type == "pcm-read" else 0.0,
            cfg.ir_drop,
            cfg.ir_drop_g_ratio,
            1.0 if cfg.bound_management == "iterative" else 0.0,
        )

    @property
    def noisy(self) -> bool:
        """Whether an MVM draws random numbers (output or short-term weight noise)."""
        return self.out_noise > 0 or self.w_noise > 0


class ProgrammedMatrix(NamedTuple):
    """One matrix on tiles: normalised conductance-domain weights and the per-(row, tile) output scale."""

    weight: torch.Tensor  # [out, C, T]: programmed (noisy, drifted) weights, each (row, tile) in [-1, 1]
    scale: torch.Tensor  # [out, C]: row abs-max x drift compensation, to bring outputs back to weight units


def split_sizes(n: int, tile: int) -> tuple[int, int]:
    """``(count, size)``: ``n`` cut into ``ceil(n / tile)`` equal tiles, as aihwkit's ``TileModuleArray`` does."""
    count = -(-n // tile)
    return count, -(-n // count)


def _tiles(w: torch.Tensor, tile: int) -> torch.Tensor:
    """``[..., out, in] -> [..., out, C, T]`` with zero padding of the last input tile."""
    n_in = w.shape[-1]
    c, t = split_sizes(n_in, tile)
    if c * t != n_in:
        w = F.pad(w, (0, c * t - n_in))
    return w.reshape(*w.shape[:-1], c, t)


def program_matrix(weight: torch.Tensor, cfg: AnalogConfig, seed: int) -> ProgrammedMatrix:
    """Program ``weight [out, in]`` (one hardware instance given by ``seed``); float32, weight's device (see
    :class:`~.programmed_stack.ProgrammedStack` for programming in place, in the weight's dtype)."""
    prog = program_matrices(weight[None], cfg, [seed])
    return ProgrammedMatrix(prog.weight[0], prog.scale[0])


def program_matrices(weights: torch.Tensor, cfg: AnalogConfig, seeds: list[int]) -> ProgrammedMatrix:
    """Program a stack ``weights [E, out, in]`` in one vectorised pass; matrix ``e``'s devices depend only on
    ``seeds[e]``. Returns ``weight [E, out, C, T]`` and ``scale [E, out, C]``."""
    from .device_models import device_program
    from .pcm_fused import pcm_program

    w = _tiles(weights.detach().to(torch.float32), cfg.tile_size)  # [E, out, C, T]
    out_rows = w.shape[1]
    row_max = w.abs().amax(-1)  # [E, out, C]
    scale = torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    target = w / scale[..., None]
    del w, row_max
    valid = _tiles(torch.ones_like(weights[0, :1], dtype=torch.float32), cfg.tile_size)[0]  # [C, T]
    padded = bool((valid == 0).any())
    programmed = target
    if cfg.programming_noise or cfg.drift:
        program = pcm_program if cfg.device == "pcm" else partial(device_program, device=cfg.device)
        programmed, baseline = program(
            target,
            seeds,
            noise_scale=cfg.noise_scale,
            programming=cfg.programming_noise,
            drift=cfg.drift,
            t_inference=cfg.t_inference,
        )
        del target
        if padded:
            programmed.mul_(valid)
        if cfg.drift_compensation:
            if padded:
                baseline = baseline * valid
            if cfg.drift_compensation_type == "per-column":  # aihwkit's PerColumnDriftCompensation: each output
                n = valid.sum(-1)  # [C] real inputs per tile
                base = (baseline.abs().sum(-1) / n).clamp_(min=1e-4)  # [E, out, C]
                del baseline
                scale = scale * base.div_((programmed.abs().sum(-1) / n).clamp_(min=1e-4))
            else:
                base = _mean_abs_per_tile(baseline, valid, cfg.tile_size)
                del baseline
                current = _mean_abs_per_tile(programmed, valid, cfg.tile_size).clamp(min=1e-4)
                scale = scale * _per_row(base / current, cfg.tile_size, out_rows)
    if cfg.gaussian_sigma > 0:
        noise = torch.stack(
            [
                torch.randn(
                    programmed.shape[1:],
                    generator=torch.Generator(device=programmed.device).manual_seed(int(s) ^ 0x5A5A),
                    device=programmed.device,
                )
                for s in seeds
            ]
        )
        programmed = (programmed + cfg.gaussian_sigma * cfg.noise_scale * noise) * valid
    return ProgrammedMatrix(programmed.contiguous(), scale.contiguous())


def _row_tile_index(out: int, tile: int, device: torch.device) -> torch.Tensor:
    return torch.arange(out, device=device) // split_sizes(out, tile)[1]


def _mean_abs_per_tile(w: torch.Tensor, valid: torch.Tensor, tile: int) -> torch.Tensor:
    """Mean |w| over each (row tile, column tile) of ``w [E, out, C, T]`` (zero in the padding) -> ``[E, R, C]``,
    padding excluded: the expected read-out of aihwkit's ``GlobalDriftCompensation`` (one-hot inputs, mean absolute
    output)."""
    out = w.shape[1]
    rows = _row_tile_index(out, tile, w.device)
    r = int(rows[-1]) + 1
    per_row = w.abs().sum(-1)  # [E, out, C]
    sums = torch.zeros(w.shape[0], r, w.shape[2], device=w.device, dtype=w.dtype).index_add_(1, rows, per_row)
    counts = torch.bincount(rows, minlength=r).to(w.dtype)[:, None] * valid.sum(-1)[None, :]
    return sums / counts


def _per_row(ratio: torch.Tensor, tile: int, out: int) -> torch.Tensor:
    """``[E, R, C]`` per-tile values -> ``[E, out, C]`` per row."""
    return ratio[:, _row_tile_index(out, tile, ratio.device)]


def quantize(x: torch.Tensor, res: float, bound: float) -> torch.Tensor:
    """aihwkit's ``UniformQuantize`` (round to nearest; step ``res * 2 * bound``) followed by clipping."""
    if res > 0:
        step = res * 2 * bound
        x = torch.round(x / step) * step
    return x.clamp(-bound, bound)


def dac(
    x: torch.Tensor, tiles: tuple[int, ...], cfg: Periphery, ranges: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input side of a tiled MVM: ``x [n, in]`` -> DAC levels ``[C, n, T]`` and the per-token, per-tile input
    scale ``[C, n, 1]``. Noise management: abs-max per (tile, token) (aihwkit's ``ABS_MAX``), or, with ``ranges``
    (``[C]`` for every row, or ``[C, n]`` per row), aihwkit's constant noise management with calibrated input
    ranges: the scale is the tile's range and the DAC clips the levels to its bound (see
    :mod:`~.input_ranges`). Levels are integers and within the DAC's bound; with bound management they stay
    unrounded and unclipped: each round of it quantises and clips them at its own input scale."""
    c, t = tiles
    xf = x.to(torch.float32)
    if c * t != xf.shape[-1]:
        xf = F.pad(xf, (0, c * t - xf.shape[-1]))
    xt = xf.reshape(-1, c, t).transpose(0, 1)  # [C, n, T]
    if ranges is None:
        nm = xt.abs().amax(-1, keepdim=True).clamp_(min=1e-30)  # 15x faster than vector_norm(ord=inf) on CPU
    else:
        r = ranges.to(device=xt.device, dtype=torch.float32)
        nm = (r[:, None, None] if r.dim() == 1 else r[..., None]).expand(c, xt.shape[1], 1)
    levels = xt / (nm * _in_step(cfg))
    if not cfg.bound_management:
        levels = _quantise_levels(levels, cfg, clip=ranges is not None)
    return levels, nm


def _quantise_levels(levels: torch.Tensor, cfg: Periphery, clip: bool = True) -> torch.Tensor:
    """DAC rounding (with a DAC) and clipping to the DAC's bound (``clip``: needless under abs-max scaling, where
    ``|x / nm| <= 1``), in place."""
    if cfg.inp_res > 0:
        levels.round_()
    if clip:
        bound = _level_bound(cfg)
        levels.clamp_(-bound, bound)
    return levels


def _level_bound(cfg: Periphery) -> float:
    """The largest DAC level: the input bound 1 in DAC steps (127 for 8 bits; 1 without a DAC)."""
    return 1.0 / _in_step(cfg)


def _in_step(cfg: Periphery) -> float:
    return cfg.inp_res * 2.0 if cfg.inp_res > 0 else 1.0


def _level_scale(cfg: Periphery) -> float:
    """A power of two that maps every DAC level into [-1, 1] exactly (1 without a DAC: inputs are in [-1, 1])."""
    return 2.0 ** -math.ceil(math.log2(1.0 / (2.0 * cfg.inp_res) + 1.0)) if cfg.inp_res > 0 else 1.0


def tile_mvm(
    levels: torch.Tensor,
    nm: torch.Tensor,
    prog: ProgrammedMatrix,
    cfg: Periphery,
    generator: torch.Generator | None = None,
    n_in: int | None = None,
) -> torch.Tensor:
    """Tile side of a tiled MVM on DAC ``levels``: IR drop and short-term weight noise, output noise, ADC
    quantisation and clipping per tile, then the digital sum of the tiles' partial outputs in weight units;
    ``[n, out]`` float32. ``n_in``: the matrix's real input count (IR drop; default: every tile full)."""
    w = prog.weight  # [out, C, T]

    def mm(v: torch.Tensor, absolute: bool, k: int) -> torch.Tensor:
        return torch.bmm(v, (w.abs() if absolute else w).permute(1, 2, 0)).float()  # [C, m, out]

    def product(lv: torch.Tensor, rows: torch.Tensor | None) -> Product:
        return _product(lv, w.dtype, mm, n_in, cfg)

    return _managed(product, levels, nm, prog.scale.T.contiguous()[:, None, :], cfg, generator)


def grouped_tile_mvm(
    levels: torch.Tensor,
    nm: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    row: torch.Tensor,
    segments: torch.Tensor | list[int],
    cfg: Periphery,
    generator: torch.Generator | None = None,
    n_in: int | None = None,
) -> torch.Tensor:
    """:func:`tile_mvm` for rows sorted by expert, every row of every expert in each elementwise step.

    ``levels [C, N, T]`` and ``nm [C, N, 1]`` are the rows' DAC levels, ``weight [E, out, C, T]`` and
    ``scale [E, out, C]`` the group's programmed matrices, ``row [N]`` each row's expert. ``segments`` says where
    each expert's rows are, in one of two forms (see :mod:`~hetmoe_compile.ir.grouped_routing`):

    - the experts' row counts, on the host: one matmul per expert and input tile, rows ``N`` all real;
    - the experts' end offsets ``[E]`` (int32) on the device: one ``grouped_mm`` per input tile and no host
      synchronisation; rows past ``ends[-1]`` come back undefined.

    ``[N, out]`` float32."""
    on_host = isinstance(segments, list)

    def product(lv: torch.Tensor, rows: torch.Tensor | None) -> Product:
        if rows is None:
            seg = segments
        else:
            sub = torch.bincount(row[rows], minlength=weight.shape[0])
            seg = sub.tolist() if on_host else sub.cumsum(0).to(torch.int32)

        def mm(v: torch.Tensor, absolute: bool, k: int) -> torch.Tensor:
            """``v [C, k N, T]``: k operands of each of the N rows, interleaved -> ``[C, k N, out]``; |W| is taken
            one expert (host counts) or one input tile (device offsets) at a time: a bounded temporary."""
            if isinstance(seg, list):
                return _per_expert_mm(v, weight, seg, absolute, k)
            outs = []
            for c, w in enumerate(weight.unbind(2)):
                wc = (w.abs() if absolute else w).transpose(1, 2)
                outs.append(F.grouped_mm(v[c], wc, offs=seg * k if k > 1 else seg))
            return torch.stack(outs).float()

        return _product(lv, weight.dtype, mm, n_in, cfg)

    valid = None
    if isinstance(segments, torch.Tensor) and cfg.bound_management:
        valid = int(segments[-1].item())  # rows past ends[-1] are padding
    scales = scale[row].permute(2, 0, 1).contiguous()
    return _managed(product, levels, nm, scales, cfg, generator, valid)


def _per_expert_mm(v: torch.Tensor, weight: torch.Tensor, counts: list[int], absolute: bool, k: int) -> torch.Tensor:
    """``W_e @ v`` (``|W_e|``) on each expert's rows of ``v [C, k N, T]`` (``k`` interleaved operands per row,
    experts' rows in order, ``counts`` of them each) into one ``[C, k N, out]`` float32 tensor."""
    out = torch.empty(v.shape[0], v.shape[1], weight.shape[1], dtype=v.dtype, device=v.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start * k, (start + n) * k)
        for c in range(v.shape[0]):
            w = weight[e, :, c]  # [out, T]
            torch.mm(v[c, rows], (w.abs() if absolute else w).T, out=out[c, rows])
        start += n
    return out.float()


class Product(NamedTuple):
    """The tiles' partial outputs ``[C, n, out]`` (float32, in ``unit``) before output noise and the ADC, and the
    variance of the short-term weight noise still to add to them (in ``unit`` squared, broadcastable; ``None``
    without weight noise). Both noises are Gaussian and independent, so the ADC side draws them as one."""

    y: torch.Tensor
    unit: float
    w_var: torch.Tensor | None = None


def _product(
    levels: torch.Tensor,
    dtype: torch.dtype,
    mm: Callable[[torch.Tensor, bool, int], torch.Tensor],
    n_in: int | None,
    cfg: Periphery,
) -> Product:
    """The tiles' partial outputs on DAC ``levels`` with tiles in ``dtype`` (``mm(v, absolute, k)``: ``W @ v`` or
    ``|W| @ v`` per tile, ``k`` operands per row interleaved in ``v``)."""
    a, unit = _tile_inputs(levels, dtype, cfg)
    if not _has_nonidealities(cfg):
        return Product(mm(a, False, 1), unit)
    y, w_var = _nonidealities(a, unit, mm, n_in, cfg)
    return Product(y, unit, w_var)


def _tile_inputs(levels: torch.Tensor, dtype: torch.dtype, cfg: Periphery) -> tuple[torch.Tensor, float]:
    """DAC levels as the tiles' operand in ``dtype``, and the unit of the products. Tiles in a lower precision
    than float32 take the levels scaled by a power of two (exact) into [-1, 1]."""
    if dtype == torch.float32:
        return levels, _in_step(cfg)
    pow2 = _level_scale(cfg)
    return (levels * pow2).to(dtype), _in_step(cfg) / pow2


def _has_nonidealities(cfg: Periphery) -> bool:
    return cfg.ir_drop > 0 or cfg.w_noise > 0


def _nonidealities(
    a: torch.Tensor,
    unit: float,
    mm: Callable[[torch.Tensor, bool, int], torch.Tensor],
    n_in: int | None,
    cfg: Periphery,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tiles' partial outputs ``[C, n, out]`` (float32, in ``unit``) of the tile operands ``a [C, n, T]`` (the
    DAC-quantised inputs ``x = a * unit``, in [-1, 1]) with IR drop, and the variance of the short-term weight
    noise (drawn by :func:`_adc`); ``mm(v, absolute, k)`` is ``W @ v`` (``|W| @ v``) per tile, with each
    tile's weights in [-1, 1]. The operands of each token are interleaved (``k`` rows per token), so this is one
    product with ``W`` and at most one with ``|W|``.

    aihwkit's ``ForwardBackwardPassIOManaged::applyNonIdealities``, per token and tile of ``n`` real inputs:

    - IR drop: ``a_i = n / g_ratio * sum_j |w_ij| |x_j|``, ``c_i = a_i (a_i (0.05 a_i - 0.2) + 0.5)``,
      ``y_i -= ir_drop * c_i * sum_j w_ij x_j (1 - (1 - j / n)^2)`` (input ``j = 0`` farthest from the output);
    - ``PCM_READ`` weight noise: ``y_i += w_noise * sqrt(sum_j |w_ij| x_j^2) * xi``; ``ADDITIVE_CONSTANT``:
      ``y_i += w_noise * ||x||_2 * xi``, a fresh standard normal ``xi`` per output and MVM."""
    c, _, t = a.shape
    plain: list[Fill | None] = [None]
    absolute: list[Fill | None] = []
    if cfg.ir_drop > 0:
        n = torch.full((c, 1, 1), float(t), device=a.device)
        if n_in is not None:
            n[-1] = n_in - (c - 1) * t
        p = 1.0 - torch.arange(t, device=a.device, dtype=torch.float32) / n  # [C, 1, T]
        profile = (1.0 - p * p).to(a.dtype)
        plain.append(lambda out: torch.mul(a, profile, out=out))
        absolute.append(lambda out: torch.abs(a, out=out))
    pcm_read = cfg.w_noise > 0 and cfg.w_noise_pcm
    if pcm_read:
        absolute.append(lambda out: torch.mul(a, a, out=out))
    products = _unstack(mm(_interleaved(a, plain), False, len(plain)), len(plain))
    y = products[0]
    sums = _unstack(mm(_interleaved(a, absolute), True, len(absolute)), len(absolute)) if absolute else ()
    if cfg.ir_drop > 0:
        current = sums[0].mul_(unit * n / cfg.ir_drop_g_ratio)  # a_i
        coef = current.mul(0.05).sub_(0.2).mul_(current).add_(0.5).mul_(current)  # c_i
        y = y.sub_(products[1].mul_(coef), alpha=cfg.ir_drop)
    if cfg.w_noise <= 0:
        return y, None
    if pcm_read:
        return y, sums[-1].clamp_(min=0).mul_(cfg.w_noise**2)
    return y, a.float().square().sum(-1, keepdim=True).mul_(cfg.w_noise**2)


Fill = Callable[[torch.Tensor], object]
"""Writes one tile operand into the view it is given (``None``: the DAC operand itself)."""


def _interleaved(a: torch.Tensor, fills: list[Fill | None]) -> torch.Tensor:
    """``k`` operands of the shape of ``a [C, n, T]`` as ``[C, k n, T]``, each token's ``k`` rows next to each other
    (``a`` itself when it is the only one)."""
    if fills == [None]:
        return a
    c, n, t = a.shape
    buf = torch.empty(c, n, len(fills), t, dtype=a.dtype, device=a.device)
    for i, fill in enumerate(fills):
        if fill is None:
            buf[:, :, i] = a
        else:
            fill(buf[:, :, i])
    return buf.view(c, n * len(fills), t)


def _unstack(y: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The products of :func:`_interleaved` operands: ``[C, k n, out]`` -> ``k`` views ``[C, n, out]``."""
    if k == 1:
        return (y,)
    c, kn, out = y.shape
    return y.view(c, kn // k, k, out).unbind(2)


def _managed(
    product: Callable[[torch.Tensor, torch.Tensor | None], Product],
    levels: torch.Tensor,
    nm: torch.Tensor,
    scale: torch.Tensor,
    cfg: Periphery,
    generator: torch.Generator | None,
    valid_rows: int | None = None,
) -> torch.Tensor:
    """The ADC side of the tiles and the digital sum over them, with aihwkit's iterative bound management when
    ``cfg`` has it. ``product(levels, rows)`` gives the tiles' partial outputs (rows: a subset of the tokens, or
    all) before the noises and the ADC.

    Bound management (``ForwardBackwardPassIOManaged::forwardVector``, ``ITERATIVE``): a (tile, token) whose
    output saturated the ADC (``|y| > out_bound`` after noise and rounding) is run again with its input scaled
    down by 2, 4, ... (a fresh draw of every noise each round), until no output saturates or the reduction
    exceeds ``max_bm_factor`` or ``max_bm_res`` over the DAC step; the last round is kept either way. Each round
    re-runs only the tokens with a saturated tile and replaces only those tiles' outputs."""
    first = _quantise_levels(levels.clone(), cfg) if cfg.bound_management else levels
    y, unit, fail = _adc(product(first, None), cfg, generator)
    if cfg.bound_management and fail is not None:
        step = _in_step(cfg)
        limit = min(cfg.max_bm_factor, cfg.max_bm_res / step) if cfg.inp_res > 0 else cfg.max_bm_factor
        reduction, r = torch.ones_like(nm), 1.0
        if valid_rows is not None:
            fail[:, valid_rows:] = False
        while r <= limit and bool(fail.any()):
            r *= 2
            rows = fail.any(0).nonzero().squeeze(1)
            again, _, fail_again = _adc(product(_quantise_levels(levels[:, rows] / r, cfg), rows), cfg, generator)
            assert fail_again is not None  # a bounded output, as in the first round
            was = fail[:, rows]
            y[:, rows] = torch.where(was[..., None], again, y[:, rows])
            reduction[:, rows] = torch.where(was[..., None], r, reduction[:, rows])
            fail[:, rows] = was & fail_again
        nm = nm * reduction
    y.mul_(nm * unit).mul_(scale)  # a contiguous scale: a strided broadcast is 10x slower
    return y[0].contiguous() if y.shape[0] == 1 else y.sum(0)


def _adc(
    p: Product, cfg: Periphery, generator: torch.Generator | None
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """Short-term weight noise, output noise, ADC quantisation and clipping on partial outputs ``p.y [C, n, out]``:
    ``(y in ADC steps, the step, which (tile, token) saturated [C, n])``; without an ADC or any noise, ``y``
    unchanged and no saturation. The two noises are independent Gaussians: one draw of their summed variance."""
    y, unit = p.y, p.unit
    adc = cfg.out_res > 0 or cfg.out_noise > 0
    out_step = cfg.out_res * 2.0 * cfg.out_bound if cfg.out_res > 0 else 1.0
    if not adc:
        if p.w_var is not None:
            y.add_(torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype).mul_(p.w_var.sqrt_()))
        return y, unit, None
    y.mul_(unit / out_step)  # now in ADC levels
    std: torch.Tensor | float | None = None
    if p.w_var is not None:
        std = p.w_var.mul_((unit / out_step) ** 2).add_((cfg.out_noise / out_step) ** 2).sqrt_()
    elif cfg.out_noise > 0:
        std = cfg.out_noise / out_step
    if std is not None:
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        if isinstance(std, torch.Tensor):
            y.add_(noise.mul_(std))
        else:
            y.add_(noise, alpha=std)
    if cfg.out_res > 0:
        y.round_()
    limit = cfg.out_bound / out_step
    fail = None
    if cfg.bound_management:
        fail = y.abs().amax(-1) > limit  # 5x faster than (|y| > limit).any(-1) or aminmax on CPU
    y.clamp_(-limit, limit)
    return y, out_step, fail


def analog_matmul(
    x: torch.Tensor,
    prog: ProgrammedMatrix,
    cfg: AnalogConfig | Periphery,
    generator: torch.Generator | None = None,
    ranges: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [n, in] @ W.T`` through the tiles of ``prog``; returns ``[n, out]`` in ``x``'s dtype. ``ranges [C]``:
    the matrix's calibrated input ranges (constant noise management; abs-max without).

    Same arithmetic as aihwkit's forward (noise management, uniform quantisation, output noise, clipping),
    arranged for few passes over memory: inputs are quantised to integer DAC levels, the tile computes in level
    units, and one multiply per output maps ADC levels back to weight units."""
    cfg = Periphery.of(cfg) if isinstance(cfg, AnalogConfig) else cfg
    levels, nm = dac(x, prog.weight.shape[1:], cfg, ranges)
    return tile_mvm(levels, nm, prog, cfg, generator, x.shape[-1]).to(x.dtype)
