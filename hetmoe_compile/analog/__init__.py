"""Analog in-memory computing physics (noise models from aihwkit)."""
from .programming_noise import program_rows, stream_seed

__all__ = ["program_rows", "stream_seed"]
