"""Routing plans for an expert group, and the choice between per-expert matmuls and one grouped GEMM.

An expert group computes ``sum_k weight[t, k] * expert[top_k_index[t, k]](hidden[t])`` over its own experts. Two
ways, same routing:

- **per expert** (:func:`routed_slots`): the pairs routed to the group, sorted by expert, and their counts on the
  host; a Python loop runs one matmul per expert with tokens (the analog group takes its other steps over runs of
  experts at once). The counts cost one host synchronisation per group and call. This is the reference path, and
  the default on the CPU.
- **grouped** (:func:`routing_plan`): every ``T*K`` pair sorted by local expert, the other groups' pairs last, and
  the experts' end offsets *on the device*; ``torch.nn.functional.grouped_mm`` multiplies each expert's rows by its
  matrix in one kernel. Nothing leaves the device (no ``nonzero``, ``bincount`` or ``tolist``), so a CUDA forward
  never waits on the host. Rows past the group's last offset are ignored and masked to zero.

``$HETMOE_GROUPED_MM`` chooses: ``auto`` (default) takes the grouped path where PyTorch has a grouped kernel that
keeps the offsets on the device (bfloat16 on CUDA compute capability 9.x and 10.x; elsewhere its fallback copies the
offsets to the host, which the per-expert loop does as well); ``1`` always; ``0`` never. The two paths compute the
same function; in bfloat16 they round differently, and output noise (analog tiles) is drawn in another order, so a
seed's noisy outputs are reproducible per path and device, not across them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ..base.errors import HetMoEError

GROUPED_MM_ENV = "HETMOE_GROUPED_MM"
MODES = ("auto", "1", "0")
_ALIGN_BYTES = 16  # grouped GEMM kernels need 16-byte aligned row strides


def grouped_mode() -> str:
    """``$HETMOE_GROUPED_MM`` checked: ``auto``, ``1`` or ``0``."""
    mode = os.environ.get(GROUPED_MM_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise HetMoEError(f"{GROUPED_MM_ENV}={mode!r} is not a mode; use auto, 1 (always grouped) or 0 (per expert)")
    return mode


def use_grouped(hidden: torch.Tensor, dtype: torch.dtype, *widths: int) -> bool:
    """Whether an expert group on ``hidden`` with matrices in ``dtype`` takes the grouped path (see module doc).
    ``widths`` are the matrices' row lengths; each must fill whole 16-byte blocks."""
    mode = grouped_mode()
    if mode == "0" or hidden.shape[0] == 0:
        return False
    if any((w * dtype.itemsize) % _ALIGN_BYTES for w in widths):
        return False
    if mode == "1":
        return True
    return hidden.is_cuda and dtype == torch.bfloat16 and torch.cuda.get_device_capability(hidden.device)[0] in (9, 10)


def routed_slots(
    top_k_index: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Group the (token, slot) pairs routed to ``expert_ids`` by local expert (per-expert path).

    Returns ``(token, flat_slot, counts)``: for each routed pair, its token index and its index into the flattened
    ``[T*K]`` routing tensors, sorted by local expert; ``counts[e]`` pairs belong to local expert ``e``.
    """
    k = top_k_index.shape[-1]
    lut = torch.full((num_experts,), -1, dtype=torch.long, device=top_k_index.device)
    lut[expert_ids] = torch.arange(expert_ids.numel(), device=top_k_index.device)
    local = lut[top_k_index.reshape(-1)]
    flat_slot = torch.nonzero(local >= 0).squeeze(1)
    local = local[flat_slot]
    local, order = torch.sort(local, stable=True)
    flat_slot = flat_slot[order]
    counts = torch.bincount(local, minlength=expert_ids.numel()).tolist()
    return flat_slot // k, flat_slot, counts


class RoutingPlan(NamedTuple):
    """Every ``T*K`` (token, slot) pair sorted by local expert (see :func:`routing_plan`)."""

    token: torch.Tensor  # [T*K] the pair's token
    flat_slot: torch.Tensor  # [T*K] its index into the flattened [T*K] routing tensors
    local: torch.Tensor  # [T*K] its local expert; len(expert_ids) for pairs of other groups (sorted last)
    row: torch.Tensor  # [T*K] ``local`` clamped to a valid expert (for per-row gathers of biases and scales)
    ends: torch.Tensor  # [E] int32: one past the last pair of each local expert (grouped_mm's offsets)

    def combine(self, hidden: torch.Tensor, top_k_weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[T, H]``: the rows ``y`` (one per pair, in plan order) weighted by their routing weights and summed per
        token. Rows of other groups count zero (grouped GEMMs leave them undefined, possibly NaN)."""
        valid = (self.local == self.row)[:, None]
        y = torch.where(valid, y * top_k_weights.reshape(-1)[self.flat_slot, None], 0)
        return torch.zeros_like(hidden).index_add_(0, self.token, y.to(hidden.dtype))


def routing_plan(top_k_index: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Every ``T*K`` (token, slot) pair sorted by local expert, device-side (grouped path)."""
    n = expert_ids.numel()
    device = top_k_index.device
    lut = torch.full((num_experts,), n, dtype=torch.long, device=device)
    lut[expert_ids] = torch.arange(n, device=device)
    local, flat_slot = torch.sort(lut[top_k_index.reshape(-1)], stable=True)
    ends = torch.searchsorted(local, torch.arange(n, device=device), right=True).to(torch.int32)
    return RoutingPlan(flat_slot // top_k_index.shape[-1], flat_slot, local, local.clamp(max=n - 1), ends)
