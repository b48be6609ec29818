"""The same hardware expressed as aihwkit objects: the reference our fused tiles are validated against."""

from __future__ import annotations

import torch
from torch import nn

from .config import AnalogConfig


def aihwkit_rpu_config(cfg: AnalogConfig):
    """A ``TorchInferenceRPUConfig`` with the periphery, mapping, noise model and compensation of ``cfg`` (which
    must have no short-term weight noise and no IR drop: aihwkit's PyTorch tile has neither; see
    :func:`native_tile_forward`)."""
    from aihwkit.inference.compensation.drift import GlobalDriftCompensation, PerColumnDriftCompensation
    from aihwkit.simulator.configs import TorchInferenceRPUConfig
    from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

    from .device_models import noise_model

    if cfg.w_noise > 0 or cfg.ir_drop > 0:
        raise ValueError("aihwkit's PyTorch tile has no w_noise or ir_drop: compare with native_tile_forward")
    rpu = TorchInferenceRPUConfig()
    rpu.forward.inp_res = cfg.inp_res if cfg.dac_bits else -1
    rpu.forward.out_res = cfg.out_res if cfg.adc_bits else -1
    rpu.forward.out_noise = cfg.out_noise
    rpu.forward.out_bound = cfg.out_bound if (cfg.adc_bits or cfg.out_noise) else -1
    rpu.forward.inp_bound = 1.0
    if cfg.noise_management == "constant":  # the input ranges divide the inputs; the tile does not rescale them
        rpu.forward.noise_management = NoiseManagementType.CONSTANT
        rpu.forward.nm_thres = 1.0
        rpu.pre_post.input_range.enable = True
        rpu.pre_post.input_range.learn_input_range = False
        rpu.pre_post.input_range.init_from_data = 0
    else:
        rpu.forward.noise_management = NoiseManagementType.ABS_MAX
    rpu.forward.bound_management = BoundManagementType.NONE
    rpu.forward.w_noise = 0.0
    rpu.mapping.weight_scaling_omega = 1.0
    rpu.mapping.weight_scaling_columnwise = True
    rpu.mapping.max_input_size = cfg.tile_size
    rpu.mapping.max_output_size = cfg.tile_size
    rpu.mapping.digital_bias = True
    rpu.noise_model = noise_model(cfg.device, cfg.noise_scale if cfg.programming_noise else 0.0)
    compensation = (
        PerColumnDriftCompensation if cfg.drift_compensation_type == "per-column" else GlobalDriftCompensation
    )
    rpu.drift_compensation = compensation() if cfg.drift_compensation else None
    return rpu


def aihwkit_linear(weight: torch.Tensor, cfg: AnalogConfig, seed: int, ranges: torch.Tensor | None = None) -> nn.Module:
    """An aihwkit analog layer holding ``weight [out, in]``, programmed (and drifted) for one instance;
    ``ranges [C]``: the input range of each input tile (constant noise management), set on every tile that takes
    that input slice."""
    from aihwkit.nn.conversion import convert_to_analog

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    analog = convert_to_analog(linear, aihwkit_rpu_config(cfg)).eval()
    if cfg.noise_management == "constant":
        if ranges is None:
            raise ValueError("constant noise management needs the input ranges")
        for name, tile in analog.named_analog_tiles():  # "analog_module.array.<input tile>.<output tile>"
            c = int(name.split(".array.")[1].split(".")[0]) if ".array." in name else 0
            tile.set_input_range(float(ranges[c]))
    torch.manual_seed(seed)
    if cfg.programming_noise or cfg.drift:
        analog.drift_analog_weights(cfg.t_inference if cfg.drift else 0.0)
    return analog


def native_tile_forward(x, weight, cfg: AnalogConfig, rng=None, ranges=None):
    """aihwkit's C++ analog forward for ``weight [out, in]`` on exact devices (no programming noise), transcribed
    loop for loop from ``src/rpucuda/rpu_forward_backward_pass.cpp`` (v1.1.0: ``forwardVector`` with abs-max noise
    management (or constant, with input ranges) and no or iterative bound management, ``prepareInput``,
    ``applyIrDrop``, ``applyOutputWeightNoise``,
    ``finalizeOutput``), in float64 numpy, one token and one tile at a time. The reference for the effects
    aihwkit's PyTorch tile lacks: its C++ tiles (``InferenceRPUConfig``) do not load under the pinned torch
    (``RuntimeError: weights must be a CPU tensor``). Tiles split the inputs as aihwkit's ``TileModuleArray`` does,
    each output row scaled to abs-max 1 per tile (``weight_scaling_columnwise``). ``rng``: a numpy Generator for
    the per-MVM noise. ``ranges [C]``: constant noise management, each input tile divided by its input range
    (aihwkit's ``pre_post.input_range``) instead of the token's abs-max. Returns ``[n, out]``."""
    import numpy as np

    from .tiles import split_sizes

    x, weight = np.asarray(x, dtype=np.float64), np.asarray(weight, dtype=np.float64)
    rng = rng or np.random.default_rng(0)
    count, size = split_sizes(weight.shape[1], cfg.tile_size)
    inp_res = cfg.inp_res * 2.0  # aihwkit scales the resolutions by the ranges (checkAndSetRes): inp_bound 1
    out_res = cfg.out_res * 2.0 * cfg.out_bound
    bounded = bool(cfg.adc_bits or cfg.out_noise)
    out = np.zeros((x.shape[0], weight.shape[0]))
    for c in range(count):
        w_tile = weight[:, c * size : (c + 1) * size]
        row_scale = np.abs(w_tile).max(axis=1)
        row_scale[row_scale == 0] = 1.0
        w = w_tile / row_scale[:, None]
        n = w.shape[1]
        for t in range(x.shape[0]):
            x_t = x[t, c * size : (c + 1) * size]
            nm = np.abs(x_t).max() if ranges is None else float(ranges[c])
            if nm <= 0:
                continue
            reduction = 0.5
            while True:  # forwardVector's bound-management loop (one pass without it)
                reduction *= 2.0
                y, passed = _one_pass(w, x_t / (nm * reduction), n, inp_res, out_res, bounded, cfg, rng)
                if cfg.bound_management == "none":
                    break
                if passed or int(reduction) > 1000 or (inp_res > 0 and reduction > 0.25 / inp_res):
                    break
            out[t] += y * nm * reduction * row_scale
    return out


def _one_pass(w, v, n, inp_res, out_res, bounded, cfg, rng):
    """``computeAnalogMV`` for one token on one tile: ``(outputs, whether none saturated)``."""
    import numpy as np

    if inp_res > 0:
        v = np.round(v / inp_res) * inp_res
    v = np.clip(v, -1.0, 1.0)
    y = w @ v
    if cfg.ir_drop > 0:
        a = (np.abs(w) @ np.abs(v)) * n / cfg.ir_drop_g_ratio
        coef = a * (a * (0.05 * a - 0.2) + 0.5)
        p = 1.0 - np.arange(n) / n
        y = y - coef * (cfg.ir_drop * (w @ (v * (1.0 - p * p))))
    if cfg.w_noise > 0:
        if cfg.w_noise_type == "pcm-read":
            std = cfg.w_noise * np.sqrt(np.abs(w) @ (v * v))
        else:
            std = cfg.w_noise * np.linalg.norm(v)
        y = y + std * rng.standard_normal(y.shape)
    if cfg.out_noise > 0:
        y = y + cfg.out_noise * rng.standard_normal(y.shape)
    if out_res > 0 and cfg.adc_bits:
        y = np.round(y / out_res) * out_res
    passed = not bounded or bool(np.all(np.abs(y) <= cfg.out_bound))
    if bounded:
        y = np.clip(y, -cfg.out_bound, cfg.out_bound)
    return y, passed
