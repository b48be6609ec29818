"""Weight-only, group-wise, symmetric integer quantisation of a ``[out, in]`` matrix (INT8 or INT4).

Each row is cut into groups of ``group_size`` consecutive inputs; a group's step is its abs-max over ``qmax`` (127
or 7) and its weights round to integers in ``[-qmax, qmax]``. Rounding moves a weight by at most half a step, so
``||dW||_F <= sqrt(sum_g group_size * (step_g / 2)^2)``. For isotropic inputs the RMS relative output error of the
layer equals ``||dW||_F / ||W||_F``; :func:`error_bound` is that ratio's worst case, from the step sizes alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...base.errors import HetMoEError

BITS = (4, 8)


class GroupwiseQuant(NamedTuple):
    """Integers ``q [out, in]`` (int8) and steps ``scale [out, in / group_size]`` (float32)."""

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        out, n = self.q.shape
        return (self.q.float().reshape(out, n // self.group_size, self.group_size) * self.scale[..., None]).reshape(
            out, n
        )


def check_quant_args(bits: int, group_size: int, in_features: int, what: str = "matrix") -> None:
    """Clear errors for a bit width other than 4 or 8 and a group size that does not divide ``in_features``."""
    if bits not in BITS:
        raise HetMoEError(f"weight quantisation supports {' and '.join(map(str, BITS))} bits, got {bits}")
    if group_size < 1 or in_features % group_size:
        fits = [g for g in range(16, in_features + 1) if in_features % g == 0 and g & (g - 1) == 0]
        raise HetMoEError(
            f"group size {group_size} does not divide the {in_features} inputs of {what}; sizes that "
            f"fit: {', '.join(map(str, fits)) or in_features}"
        )


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int) -> GroupwiseQuant:
    """Quantise ``w [out, in]`` (any float dtype; computed in float32)."""
    out, n = w.shape
    check_quant_args(bits, group_size, n)
    qmax = 2 ** (bits - 1) - 1
    groups = w.detach().float().reshape(out, n // group_size, group_size)
    amax = groups.abs().amax(-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(groups / scale[..., None]), -qmax, qmax).to(torch.int8)
    return GroupwiseQuant(q.reshape(out, n), scale, bits, group_size)


def error_bound(quant: GroupwiseQuant, w: torch.Tensor) -> float:
    """Worst-case ``||dW||_F / ||W||_F`` from the steps: every weight off by at most half its group's step."""
    norm = float(torch.linalg.vector_norm(w.detach().float()))
    worst = float(torch.sqrt((quant.group_size * (quant.scale / 2) ** 2).sum()))
    return worst / norm if norm > 0 else 0.0
