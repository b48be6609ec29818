"""A router whose logits pass through a per-expert affine map before the family's own routing.

:class:`RecalibratedRouter` wraps the original router (``inner``). It computes the logits as the family does
(``F.linear(hidden.reshape(-1, H), weight[, bias])``, in float32 where the family does), maps them
(``logits * scale + shift``, in float32), and feeds the result through a *shim*: a per-call copy of the original
router whose weight is the identity ``[E, E]`` (bias zero, ``hidden_dim = E``). The shim's forward is the family's
own, so its softmax/sigmoid, correction bias, group-limited top-k, normalisation and scaling run unchanged and it
returns ``(logits, weights, indices)``. The shim shares the router's hooks, so hooks registered on the original
router (e.g. transformers' router-logit recorder) see the recalibrated routing. With ``scale = 1, shift = 0`` the
outputs equal the original router's exactly (the identity matmul is exact).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

FLOAT32_LOGIT_ROUTERS = frozenset({"DeepseekV3TopkRouter"})
"""Router classes that compute their logits in float32 whatever the model's dtype."""


class RecalibratedRouter(nn.Module):
    """``inner`` with its logits mapped by ``scale [E]`` and ``shift [E]`` (float32 buffers) before routing.

    Attributes not found here (``weight``, ``top_k``, ``num_experts``, ...) are read from ``inner``, so code that
    inspects routers (recognize, router-norm scoring) sees the original router.
    """

    inner: nn.Module

    def __init__(self, inner: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        if isinstance(inner, RecalibratedRouter):
            inner = inner.inner
        weight = cast(torch.Tensor, inner.weight)
        num_experts = weight.shape[0]
        if scale.shape != (num_experts,) or shift.shape != (num_experts,):
            raise ValueError(
                f"scale and shift must be [{num_experts}], got {tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        self.inner = inner
        self.float32_logits = type(inner).__name__ in FLOAT32_LOGIT_ROUTERS
        self.register_buffer("scale", scale.detach().to(weight.device, torch.float32).clone())
        self.register_buffer("shift", shift.detach().to(weight.device, torch.float32).clone())
        self.register_buffer("identity", torch.eye(num_experts, device=weight.device), persistent=False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def raw_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The original router's logits ``[T, E]``, computed as the family does."""
        inner = self.inner
        weight = cast(torch.Tensor, inner.weight)
        bias = getattr(inner, "bias", None)
        h = hidden_states.reshape(-1, weight.shape[1])
        if self.float32_logits:
            h, weight = h.float(), weight.float()
            bias = None if bias is None else bias.float()
        return F.linear(h, weight, bias)

    def _shim(self, dtype: torch.dtype) -> nn.Module:
        """A copy of ``inner`` computing ``F.linear(logits, I)``: the family's routing on given logits."""
        inner = self.inner
        shim = object.__new__(type(inner))
        shim.__dict__.update(inner.__dict__)  # plain attributes and the hook dicts (shared)
        shim.__dict__["_parameters"] = {k: v for k, v in inner._parameters.items() if k not in ("weight", "bias")}
        buffers = {k: v for k, v in inner._buffers.items() if k not in ("weight", "bias")}
        weight = self.identity.to(dtype)
        buffers["weight"] = weight
        if getattr(inner, "bias", None) is not None:
            buffers["bias"] = torch.zeros_like(weight[0])
        shim.__dict__["_buffers"] = buffers
        shim.__dict__["_non_persistent_buffers_set"] = set(buffers)
        shim.__dict__["hidden_dim"] = self.identity.shape[0]
        return shim

    def forward(self, hidden_states: torch.Tensor):
        logits = self.raw_logits(hidden_states)
        calibrated = (logits.float() * self.scale.float() + self.shift.float()).to(logits.dtype)
        return self._shim(calibrated.dtype)(calibrated)

    def extra_repr(self) -> str:
        return f"experts={self.scale.numel()}, float32_logits={self.float32_logits}"
