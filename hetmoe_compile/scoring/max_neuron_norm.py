"""The paper's selector: per linear layer of an expert, the largest L2 norm of one neuron's weight vector (a row of
the ``[out_features, in_features]`` weight); the expert's score is the product over its gate, up and down layers."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import cast

import numpy as np
import torch
from torch import nn

from ..base.host_memory import bounded_allocator
from ..models.adapter import ExpertLayout
from ..models.device_map import onloaded
from ..models.recognize import ModelInfo
from .base import register_selector


def _row_norms(t: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norms along ``dim`` in the tensor's own dtype (float32 for half types), returned as float64.

    Passing ``dtype=float64`` to ``vector_norm`` would materialise a float64 copy of the whole fused tensor; half
    types accumulate in float32, which also upcasts the input, so they go one expert at a time."""
    if t.dtype not in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(t, dim=dim).double()
    bounded = bounded_allocator() if t.device.type == "cpu" else contextlib.nullcontext()
    with bounded:  # each expert's float32 temporary goes back to the system, not to a growing heap
        return torch.stack(
            [torch.linalg.vector_norm(t[e], dim=dim - 1, dtype=torch.float32) for e in range(t.shape[0])]
        ).double()


def max_neuron_norms(experts: nn.Module | SimpleNamespace, layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """``{"gate"|"up"|"down": [E]}`` largest neuron (row) L2 norm per expert, read from the fused tensors without
    copying them. Works on a family's experts module (or a namespace holding its ``gate_up_proj`` and
    ``down_proj``) and on a canonical :class:`HetExperts`."""
    from ..ir.expert_group import ExpertGroup, HetExperts

    with torch.no_grad():
        if isinstance(experts, HetExperts):
            groups = cast(list[ExpertGroup], list(experts.groups.values()))  # a canonical layer's groups
            parts = [(g.expert_ids, max_neuron_norms_canonical(g.gate_up, g.down)) for g in groups]
            out = {k: torch.empty(experts.num_experts, dtype=torch.float64) for k in ("gate", "up", "down")}
            for ids, norms in parts:
                for k in out:
                    out[k][ids.cpu()] = norms[k].cpu()
            return out
        gate_up, down = cast(torch.Tensor, experts.gate_up_proj), cast(torch.Tensor, experts.down_proj)
        if layout.transposed:  # [E, in, out]: a neuron is a column
            gu_rows = _row_norms(gate_up, 1)  # [E, 2I]
            down_rows = _row_norms(down, 1)  # [E, H]
        else:
            gu_rows = _row_norms(gate_up, 2)
            down_rows = _row_norms(down, 2)
        if layout.interleaved:
            gate_rows, up_rows = gu_rows[:, 0::2], gu_rows[:, 1::2]
        else:
            gate_rows, up_rows = gu_rows.chunk(2, dim=1)
        return {"gate": gate_rows.amax(1), "up": up_rows.amax(1), "down": down_rows.amax(1)}


def max_neuron_norms_canonical(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """Same as :func:`max_neuron_norms` for canonical ``gate_up [n, 2I, H]``, ``down [n, H, I]``."""
    gu_rows = _row_norms(gate_up, 2)
    gate_rows, up_rows = gu_rows.chunk(2, dim=1)
    down_rows = _row_norms(down, 2)
    return {"gate": gate_rows.amax(1), "up": up_rows.amax(1), "down": down_rows.amax(1)}


@register_selector("max-neuron-norm", False, "product over gate/up/down of the largest neuron L2 norm (the paper's)")
def score_max_neuron_norm(model: nn.Module, info: ModelInfo, calibration=None, seed: int = 0) -> dict[int, np.ndarray]:
    out = {}
    for layer in info.moe_layers:
        experts = model.get_submodule(layer.experts)
        with onloaded(experts):  # a layer a device map offloaded
            norms = max_neuron_norms(experts, info.adapter.layout)
        out[layer.index] = (norms["gate"] * norms["up"] * norms["down"]).cpu().numpy()
    return out
