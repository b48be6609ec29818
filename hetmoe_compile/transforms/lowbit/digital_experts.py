"""Low-bit digital experts: quantise the weights of every digital expert group of a canonical model (in place).

The weights are replaced by their dequantised values (fake quantisation), so simulation, evaluation and the
``torch.compile`` backend see exactly what an INT8/INT4 kernel computes; the ONNX export re-derives the integers
and emits ``com.microsoft::MatMulNBits``. Analog groups and dense modules are untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...ir.expert_group import device_groups
from ...models.recognize import ModelInfo, recognize
from .groupwise import check_quant_args, error_bound, quantize_groupwise

QUANT_ATTR = "hetmoe_weight_quant"
"""Attribute set on a quantised :class:`ExpertGroup`: ``{"bits": ..., "group_size": ...}``."""


@dataclass
class ExpertQuantError:
    """One digital expert's quantisation error: per matrix the worst-case bound and the measured relative weight
    error (``||dW||_F / ||W||_F``), and the measured relative error of the expert's output on ``inputs``."""

    layer: int
    expert: int
    gate_up_bound: float
    gate_up_error: float
    down_bound: float
    down_error: float
    output_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def _rel(delta: torch.Tensor, ref: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(ref.float()))
    return float(torch.linalg.vector_norm(delta.float())) / norm if norm > 0 else 0.0


@torch.no_grad()
def quantize_digital_experts(
    model: nn.Module,
    bits: int,
    group_size: int = 128,
    info: ModelInfo | None = None,
    inputs: torch.Tensor | None = None,
    seed: int = 0,
) -> list[ExpertQuantError]:
    """Quantise the digital experts of a canonical model; returns each expert's error. ``inputs [n, H]`` are the
    tokens the output error is measured on (default: 256 standard-normal vectors drawn with ``seed``)."""
    info = info or recognize(model)
    rows: list[ExpertQuantError] = []
    for layer, _, group in device_groups(model, info.moe_layers, "digital", "quantize_digital_experts"):
        if getattr(group, QUANT_ATTR, None):
            raise ValueError(f"layer {layer.index}: digital experts are quantised already")
        hidden, inter = group.gate_up.shape[2], group.down.shape[2]
        check_quant_args(bits, group_size, hidden, f"layer {layer.index}'s gate/up projections (hidden size)")
        check_quant_args(bits, group_size, inter, f"layer {layer.index}'s down projections (expert width)")
        x = inputs
        if x is None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            x = torch.randn(256, hidden, generator=gen).to(group.gate_up.device, group.gate_up.dtype)
        for local, expert in enumerate(group.ids):
            ref = group.run_expert(local, x)
            errs = {}
            for name in ("gate_up", "down"):
                w = getattr(group, name)[local]
                quant = quantize_groupwise(w, bits, group_size)
                deq = quant.dequantize().to(w.dtype)
                errs[name] = (error_bound(quant, w), _rel(deq - w, w))
                w.copy_(deq)
            out = group.run_expert(local, x)
            rows.append(ExpertQuantError(layer.index, expert, *errs["gate_up"], *errs["down"], _rel(out - ref, ref)))
        setattr(group, QUANT_ATTR, {"bits": bits, "group_size": group_size})
    return rows
