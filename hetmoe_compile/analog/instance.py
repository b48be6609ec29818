"""One hardware instance: which random stream programs which matrix, and which one draws the output noise.

Every path that makes an instance (eager :func:`~.simulate.simulate`, the FX :class:`RewriteAnalogPass`, the
ONNX instance export) programs through :func:`program_expert_stacks` (in place) or :func:`program_group`
(copies) and seeds the output noise with :func:`output_noise_seed`, so instance ``seed`` is the same devices
everywhere. An expert's devices depend only on ``(seed, layer, expert id, matrix)``: two placements evaluated with
the same seed see the same devices (common random numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import AnalogConfig
from .programmed_stack import ProgrammedStack
from .programming_noise import OUT_NOISE_STREAM, stream_seed
from .tiles import program_matrices

MATRICES = ("gate_up", "down")
"""An expert's matrices, in stream order (matrix ``m`` of expert ``e`` is stream ``(seed, layer, e, m)``)."""
LINEAR_STREAM = 1 << 21
"""Stream key of a dense linear's weights (dense-on-analog ablation, HPD halves), apart from the expert streams."""


def expert_seeds(seed: int, layer: int, expert_ids: Sequence[int], matrix: int) -> list[int]:
    """The programming seed of matrix ``matrix`` (an index into :data:`MATRICES`) of each expert."""
    return [stream_seed(seed, layer, e, matrix) for e in expert_ids]


def output_noise_seed(seed: int, key: int) -> int:
    """The first output-noise generator seed of layer (or dense linear) ``key`` in instance ``seed``."""
    return stream_seed(seed, key, OUT_NOISE_STREAM)


def linear_seed(seed: int, key: int) -> int:
    """The programming seed of dense linear ``key``'s weight in instance ``seed``."""
    return stream_seed(seed, key, LINEAR_STREAM)


def program_expert_stacks(
    stacks: Sequence[ProgrammedStack], cfg: AnalogConfig, seed: int, layer: int, expert_ids: Sequence[int]
) -> None:
    """Program a group's ``(gate_up, down)`` stacks in place for instance ``seed``."""
    for m, stack in enumerate(stacks):
        stack.program(cfg, expert_seeds(seed, layer, expert_ids, m))


def program_group(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    expert_ids: torch.Tensor | Sequence[int],
    cfg: AnalogConfig,
    seed: int,
    layer: int,
) -> dict[str, torch.Tensor]:
    """Programmed copies (float32) of a group's matrices for instance ``seed``: ``{gate_up,down}_{weight,scale}``
    (the devices :func:`program_expert_stacks` programs)."""
    ids = expert_ids.tolist() if isinstance(expert_ids, torch.Tensor) else list(expert_ids)
    out: dict[str, torch.Tensor] = {}
    for m, (name, stack) in enumerate(zip(MATRICES, (gate_up, down))):
        prog = program_matrices(stack, cfg, expert_seeds(seed, layer, ids, m))
        out[f"{name}_weight"], out[f"{name}_scale"] = prog.weight, prog.scale
    return out
