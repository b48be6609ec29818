"""The expert-group op and modules that replace a model's fused experts module.

``hetmoe::expert_group`` computes the routed contribution of one group of experts (a subset of a layer's experts,
all on one device). It is a ``torch.library.custom_op``, so it appears as one node in ``torch.export`` and Dynamo
graphs: placement tags and the analog rewrite are then clean graph passes. Its compute scales with the number of
tokens routed to the group's experts (gather, per-expert matmuls, scatter-add), not with experts x tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..base.devices import DEVICES
from .grouped_routing import routed_slots, routing_plan, use_grouped


def activate(gate_up: torch.Tensor, activation: str, act_name: str, alpha: float, limit: float) -> torch.Tensor:
    """The expert's gated activation on ``[..., 2I]`` pre-activations (gate half first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "glu":
        act = F.silu if act_name == "silu" else ACT2FN[act_name]
        return act(gate) * up
    if activation == "gpt_oss_glu":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"unknown expert activation '{activation}'")


def expert_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    act_name: str = "silu",
    alpha: float = 0.0,
    limit: float = 0.0,
) -> torch.Tensor:
    """One expert on tokens ``x [n, H]`` with canonical weights ``gate_up [2I, H]``, ``down [H, I]``."""
    h = activate(F.linear(x, gate_up, gate_up_bias), activation, act_name, alpha, limit)
    return F.linear(h, down, down_bias)


@torch.library.custom_op("hetmoe::expert_group", mutates_args=())
def expert_group_op(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    num_experts: int,
    activation: str,
    act_name: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Sum over routed (token, slot) pairs of ``weight * expert(hidden[token])`` for the group's experts."""
    if use_grouped(hidden, gate_up.dtype, gate_up.shape[-1], down.shape[-1]):
        return _grouped_expert_group(
            hidden,
            top_k_index,
            top_k_weights,
            expert_ids,
            gate_up,
            down,
            gate_up_bias,
            down_bias,
            num_experts,
            activation,
            act_name,
            alpha,
            limit,
        )
    out = torch.zeros_like(hidden)
    token, flat_slot, counts = routed_slots(top_k_index, expert_ids, num_experts)
    weights = top_k_weights.reshape(-1)[flat_slot]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token[start : start + n]
        y = expert_mlp(
            hidden[tok],
            gate_up[e],
            down[e],
            None if gate_up_bias is None else gate_up_bias[e],
            None if down_bias is None else down_bias[e],
            activation,
            act_name,
            alpha,
            limit,
        )
        y = y * weights[start : start + n, None]
        out.index_add_(0, tok, y.to(out.dtype))
        start += n
    return out


def _grouped_expert_group(
    hidden,
    top_k_index,
    top_k_weights,
    expert_ids,
    gate_up,
    down,
    gate_up_bias,
    down_bias,
    num_experts,
    activation,
    act_name,
    alpha,
    limit,
) -> torch.Tensor:
    """The grouped path of :func:`expert_group_op` (see :mod:`.grouped_routing`): no host synchronisation."""
    plan = routing_plan(top_k_index, expert_ids, num_experts)
    h = F.grouped_mm(hidden[plan.token].to(gate_up.dtype), gate_up.transpose(1, 2), offs=plan.ends)
    if gate_up_bias is not None:
        h = h + gate_up_bias[plan.row]
    h = activate(h, activation, act_name, alpha, limit)
    y = F.grouped_mm(h, down.transpose(1, 2), offs=plan.ends)
    if down_bias is not None:
        y = y + down_bias[plan.row]
    return plan.combine(hidden, top_k_weights, y)


@expert_group_op.register_fake
def _(
    hidden,
    top_k_index,
    top_k_weights,
    expert_ids,
    gate_up,
    down,
    gate_up_bias,
    down_bias,
    num_experts,
    activation,
    act_name,
    alpha,
    limit,
):
    return torch.empty_like(hidden)


class ExpertGroupCall(NamedTuple):
    """The 13 arguments of ``hetmoe::expert_group``, by name: tensors (or the graph nodes that make them), then the
    group's settings. The split and analog-rewrite passes read and rebuild graph nodes through one (:meth:`of`,
    ``_replace``), and the ONNX placeholder's inputs and attributes are its fields."""

    hidden: Any
    top_k_index: Any
    top_k_weights: Any
    expert_ids: Any
    gate_up: Any
    down: Any
    gate_up_bias: Any
    down_bias: Any
    num_experts: Any
    activation: Any
    act_name: Any
    alpha: Any
    limit: Any

    @classmethod
    def of(cls, node) -> ExpertGroupCall:
        """The arguments of an FX node that calls the op (positional or by keyword)."""
        args = list(node.args) + [None] * (len(cls._fields) - len(node.args))
        for i, name in enumerate(cls._fields):
            if name in node.kwargs:
                args[i] = node.kwargs[name]
        return cls(*args)

    def weights(self) -> tuple:
        """The group's own tensors: ``(expert_ids, gate_up, down, gate_up_bias, down_bias)``."""
        return tuple(getattr(self, k) for k in GROUP_TENSORS)


ROUTING_INPUTS = ("hidden", "top_k_index", "top_k_weights")
GROUP_TENSORS = ("expert_ids", "gate_up", "down", "gate_up_bias", "down_bias")
SETTINGS = ("num_experts", "activation", "act_name", "alpha", "limit")
"""The op's arguments in three parts: the layer's routing inputs, the group's tensors, its settings (attributes
in ONNX)."""
assert ExpertGroupCall._fields == ROUTING_INPUTS + GROUP_TENSORS + SETTINGS
assert tuple(a.name for a in torch.ops.hetmoe.expert_group.default._schema.arguments) == ExpertGroupCall._fields


class ExpertWeights(NamedTuple):
    """Canonical weights of a set of experts: one row is one neuron."""

    gate_up: torch.Tensor  # [n, 2I, H], gate rows then up rows
    down: torch.Tensor  # [n, H, I]
    gate_up_bias: torch.Tensor | None  # [n, 2I]
    down_bias: torch.Tensor | None  # [n, H]


Weights = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]
"""One expert's canonical ``(gate_up [2I, H], down [H, I], gate_up_bias, down_bias)``."""


class ExpertGroup(nn.Module):
    """A subset of one layer's routed experts, all on one device, in canonical weight layout."""

    expert_ids: torch.Tensor

    def __init__(
        self,
        weights: ExpertWeights,
        expert_ids: torch.Tensor,
        num_experts: int,
        device_kind: str,
        activation: str,
        act_name: str = "silu",
        alpha: float = 0.0,
        limit: float = 0.0,
    ) -> None:
        super().__init__()
        if device_kind not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got '{device_kind}'")
        self.device_kind = device_kind
        self.num_experts = num_experts
        self.activation = activation
        self.act_name = act_name
        self.alpha = float(alpha)
        self.limit = float(limit)
        self.register_buffer("expert_ids", expert_ids.to(torch.long).clone(), persistent=True)
        self.gate_up = nn.Parameter(weights.gate_up, requires_grad=False)
        self.down = nn.Parameter(weights.down, requires_grad=False)
        self.gate_up_bias = None if weights.gate_up_bias is None else nn.Parameter(weights.gate_up_bias, False)
        self.down_bias = None if weights.down_bias is None else nn.Parameter(weights.down_bias, False)

    @property
    def ids(self) -> list[int]:
        return self.expert_ids.tolist()

    def expert(self, local: int) -> Weights:
        """Canonical ``(gate_up, down, gate_up_bias, down_bias)`` of the group's ``local``-th expert."""
        return (
            self.gate_up[local],
            self.down[local],
            None if self.gate_up_bias is None else self.gate_up_bias[local],
            None if self.down_bias is None else self.down_bias[local],
        )

    def run_expert(self, local: int, x: torch.Tensor, weights: Weights | None = None) -> torch.Tensor:
        """The group's ``local``-th expert on tokens ``x`` (optionally with replacement ``weights``)."""
        return expert_mlp(x, *(weights or self.expert(local)), self.activation, self.act_name, self.alpha, self.limit)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return torch.ops.hetmoe.expert_group(  # in ExpertGroupCall's order; no tuple built on this hot path
            hidden,
            top_k_index,
            top_k_weights,
            self.expert_ids,
            self.gate_up,
            self.down,
            self.gate_up_bias,
            self.down_bias,
            self.num_experts,
            self.activation,
            self.act_name,
            self.alpha,
            self.limit,
        )

    def extra_repr(self) -> str:
        return f"device={self.device_kind}, experts={self.ids}"


class HetExperts(nn.Module):
    """Drop-in replacement for a family's experts module: ``(hidden [T,H], top_k_index [T,K],
    top_k_weights [T,K]) -> [T,H]``, the sum of its digital and analog groups. Routing is untouched."""

    groups: nn.ModuleDict

    def __init__(self, groups: dict[str, ExpertGroup], num_experts: int, layer_index: int) -> None:
        super().__init__()
        self.groups = nn.ModuleDict(groups)
        self.num_experts = num_experts
        self.layer_index = layer_index

    def device_of(self) -> dict[int, str]:
        """Expert id -> device."""
        return {e: name for name, g in self.groups.items() for e in cast(ExpertGroup, g).ids}

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for group in self.groups.values():
            y = group(hidden, top_k_index, top_k_weights)
            out = y if out is None else out + y
        return torch.zeros_like(hidden) if out is None else out


def device_groups(model: nn.Module, moe_layers, device: str, caller: str):
    """``(layer, het_experts, group)`` for each MoE layer of a canonical model that has a ``device`` group."""
    for layer in moe_layers:
        het = model.get_submodule(layer.experts)
        if not isinstance(het, HetExperts):
            raise ValueError(f"{caller}() needs a canonical model: call canonicalize(model, placement.devices())")
        if device in het.groups:
            yield layer, het, het.groups[device]
