"""The same hardware expressed as aihwkit objects: the reference our fused tiles are validated against."""

from __future__ import annotations

import torch
from torch import nn

from .config import AnalogConfig


def aihwkit_rpu_config(cfg: AnalogConfig):
    """A ``TorchInferenceRPUConfig`` with the periphery, mapping, noise model and compensation of ``cfg``."""
    from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
    from aihwkit.simulator.configs import TorchInferenceRPUConfig
    from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

    rpu = TorchInferenceRPUConfig()
    rpu.forward.inp_res = cfg.inp_res if cfg.dac_bits else -1
    rpu.forward.out_res = cfg.out_res if cfg.adc_bits else -1
    rpu.forward.out_noise = cfg.out_noise
    rpu.forward.out_bound = cfg.out_bound if (cfg.adc_bits or cfg.out_noise) else -1
    rpu.forward.inp_bound = 1.0
    rpu.forward.noise_management = NoiseManagementType.ABS_MAX
    rpu.forward.bound_management = BoundManagementType.NONE
    rpu.forward.w_noise = 0.0
    rpu.mapping.weight_scaling_omega = 1.0
    rpu.mapping.weight_scaling_columnwise = True
    rpu.mapping.max_input_size = cfg.tile_size
    rpu.mapping.max_output_size = cfg.tile_size
    rpu.mapping.digital_bias = True
    rpu.noise_model = PCMLikeNoiseModel(prog_noise_scale=cfg.noise_scale if cfg.programming_noise else 0.0)
    rpu.drift_compensation = GlobalDriftCompensation() if cfg.drift_compensation else None
    return rpu


def aihwkit_linear(weight: torch.Tensor, cfg: AnalogConfig, seed: int) -> nn.Module:
    """An aihwkit analog layer holding ``weight [out, in]``, programmed (and drifted) for one instance."""
    from aihwkit.nn.conversion import convert_to_analog

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    analog = convert_to_analog(linear, aihwkit_rpu_config(cfg)).eval()
    torch.manual_seed(seed)
    if cfg.programming_noise or cfg.drift:
        analog.drift_analog_weights(cfg.t_inference if cfg.drift else 0.0)
    return analog
