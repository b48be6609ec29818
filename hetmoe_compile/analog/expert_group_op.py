"""``hetmoe::analog_expert_group``: an expert group whose matrices run on simulated AIMC tiles.

Same interface and routing as ``hetmoe::expert_group`` (compute scales with routed tokens); each expert's
gate/up and down matrices are pre-programmed (:mod:`.instance`) and every MVM goes through the tiles.
Output noise is drawn from a generator seeded by ``rng_state``, which the op advances by one per call, so a
hardware instance's outputs are reproducible from its seed.
"""

from __future__ import annotations

import torch

from ..expert_group import activate
from ..grouped_routing import routed_slots, routing_plan, use_grouped
from .tiles import Periphery, ProgrammedMatrix, analog_matmul, dac, grouped_tile_mvm, tile_mvm


@torch.library.custom_op("hetmoe::analog_expert_group", mutates_args=("rng_state",))
def analog_expert_group_op(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up_weight: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down_weight: torch.Tensor,
    down_scale: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    rng_state: torch.Tensor,
    num_experts: int,
    activation: str,
    act_name: str,
    alpha: float,
    limit: float,
    periphery: list[float],
    gate_up_range: torch.Tensor | None = None,
    down_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed contribution of the group's experts, every MVM on simulated tiles (biases added digitally).
    ``gate_up_range``/``down_range [E, C]``: calibrated input ranges (constant noise management; abs-max when
    absent)."""
    io = Periphery(*periphery)
    gen = None
    if io.noisy:
        gen = torch.Generator(device=hidden.device).manual_seed(int(rng_state.item()))
        rng_state.add_(1)
    if use_grouped(
        hidden,
        gate_up_weight.dtype,
        gate_up_weight.shape[-1],
        down_weight.shape[-1],
        gate_up_weight.shape[-2] * gate_up_weight.shape[-1],
        down_weight.shape[-2] * down_weight.shape[-1],
    ):
        return _grouped_analog(
            hidden,
            top_k_index,
            top_k_weights,
            expert_ids,
            gate_up_weight,
            gate_up_scale,
            down_weight,
            down_scale,
            gate_up_bias,
            down_bias,
            num_experts,
            activation,
            act_name,
            alpha,
            limit,
            io,
            gen,
            gate_up_range,
            down_range,
        )
    out = torch.zeros_like(hidden)
    token, flat_slot, counts = routed_slots(top_k_index, expert_ids, num_experts)
    weights = top_k_weights.reshape(-1)[flat_slot]
    # Under abs-max noise management a token routed to several analog experts enters the DACs with the same levels:
    # convert every token once. Calibrated ranges differ per expert.
    shared = dac(hidden, gate_up_weight.shape[2:], io) if gate_up_range is None else None
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token[start : start + n]
        gate_up = ProgrammedMatrix(gate_up_weight[e], gate_up_scale[e])
        if shared is None:
            assert gate_up_range is not None
            levels, nm = dac(hidden[tok], gate_up_weight.shape[2:], io, gate_up_range[e])
        else:
            levels, nm = shared[0][:, tok], shared[1][:, tok]
        h = tile_mvm(levels, nm, gate_up, io, gen, hidden.shape[-1]).to(hidden.dtype)
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        h = activate(h, activation, act_name, alpha, limit)
        ranges = None if down_range is None else down_range[e]
        y = analog_matmul(h, ProgrammedMatrix(down_weight[e], down_scale[e]), io, gen, ranges)
        if down_bias is not None:
            y = y + down_bias[e]
        out.index_add_(0, tok, (y * weights[start : start + n, None]).to(out.dtype))
        start += n
    return out


def _grouped_analog(
    hidden,
    top_k_index,
    top_k_weights,
    expert_ids,
    gate_up_weight,
    gate_up_scale,
    down_weight,
    down_scale,
    gate_up_bias,
    down_bias,
    num_experts,
    activation,
    act_name,
    alpha,
    limit,
    io: Periphery,
    gen: torch.Generator | None,
    gate_up_range: torch.Tensor | None = None,
    down_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """The grouped path of :func:`analog_expert_group_op` (see :mod:`~hetmoe_compile.grouped_routing`)."""
    plan = routing_plan(top_k_index, expert_ids, num_experts)
    tok = plan.token
    if gate_up_range is None:
        levels, nm = dac(hidden, gate_up_weight.shape[2:], io)
        levels, nm = levels[:, tok], nm[:, tok]
    else:  # each row at its expert's ranges
        levels, nm = dac(hidden[tok], gate_up_weight.shape[2:], io, gate_up_range[plan.row].T)
    h = grouped_tile_mvm(levels, nm, gate_up_weight, gate_up_scale, plan.row, plan.ends, io, gen, hidden.shape[-1])
    h = h.to(hidden.dtype)
    if gate_up_bias is not None:
        h = h + gate_up_bias[plan.row]
    h = activate(h, activation, act_name, alpha, limit)
    levels, nm = dac(h, down_weight.shape[2:], io, None if down_range is None else down_range[plan.row].T)
    y = grouped_tile_mvm(levels, nm, down_weight, down_scale, plan.row, plan.ends, io, gen, h.shape[-1])
    y = y.to(hidden.dtype)
    if down_bias is not None:
        y = y + down_bias[plan.row]
    return plan.combine(hidden, top_k_weights, y)


@analog_expert_group_op.register_fake
def _(hidden, *args, **kwargs):
    return torch.empty_like(hidden)
