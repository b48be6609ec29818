"""Analog in-memory computing: hardware presets, tiled AIMC physics (aihwkit noise models), simulation."""

from ..base.preset_summaries import PRESET_SUMMARIES
from .config import PRESETS, AnalogConfig, analog_config
from .programming_noise import program_rows, stream_seed
from .simulate import AnalogExpertGroup, AnalogLinear, restore_digital, simulate
from .tiles import ProgrammedMatrix, analog_matmul, program_matrix

__all__ = [
    "PRESETS",
    "PRESET_SUMMARIES",
    "AnalogConfig",
    "AnalogExpertGroup",
    "AnalogLinear",
    "ProgrammedMatrix",
    "analog_config",
    "analog_matmul",
    "program_matrix",
    "program_rows",
    "restore_digital",
    "simulate",
    "stream_seed",
]
