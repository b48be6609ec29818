"""``hetmoe::analog_expert_group``: an expert group whose matrices run on simulated AIMC tiles.

Same interface and routing as ``hetmoe::expert_group`` (compute scales with routed tokens); each expert's
gate/up and down matrices are pre-programmed (:func:`program_group`) and every MVM goes through the tiles.
Output noise is drawn from a generator seeded by ``rng_state``, which the op advances by one per call, so a
hardware instance's outputs are reproducible from its seed.
"""
from __future__ import annotations

import torch

from ..expert_group import activate, routed_slots
from .programming_noise import stream_seed
from .config import AnalogConfig
from .tiles import Periphery, ProgrammedMatrix, analog_matmul, dac, program_matrices, tile_mvm

MATRICES = ("gate_up", "down")


def program_group(gate_up: torch.Tensor, down: torch.Tensor, expert_ids: torch.Tensor, cfg: AnalogConfig,
                  seed: int, layer: int) -> dict[str, torch.Tensor]:
    """Program every expert of a group. An expert's devices depend only on (seed, layer, expert id, matrix), so
    two placements evaluated with the same seed see the same devices (common random numbers)."""
    out: dict[str, torch.Tensor] = {}
    experts = expert_ids.tolist()
    for m, (name, stack) in enumerate(zip(MATRICES, (gate_up, down))):
        prog = program_matrices(stack, cfg, [stream_seed(seed, layer, e, m) for e in experts])
        out[f"{name}_weight"], out[f"{name}_scale"] = prog.weight, prog.scale
    return out


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
) -> torch.Tensor:
    """Routed contribution of the group's experts, every MVM on simulated tiles (biases added digitally)."""
    io = Periphery(*periphery)
    gen = None
    if io.out_noise > 0:
        gen = torch.Generator(device=hidden.device).manual_seed(int(rng_state.item()))
        rng_state.add_(1)
    out = torch.zeros_like(hidden)
    token, flat_slot, counts = routed_slots(top_k_index, expert_ids, num_experts)
    weights = top_k_weights.reshape(-1)[flat_slot]
    # A token routed to several analog experts enters the DACs with the same levels: convert every token once.
    levels, nm = dac(hidden, gate_up_weight.shape[2:], io)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token[start : start + n]
        gate_up = ProgrammedMatrix(gate_up_weight[e], gate_up_scale[e])
        h = tile_mvm(levels[:, tok], nm[:, tok], gate_up, io, gen).to(hidden.dtype)
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        h = activate(h, activation, act_name, alpha, limit)
        y = analog_matmul(h, ProgrammedMatrix(down_weight[e], down_scale[e]), io, gen)
        if down_bias is not None:
            y = y + down_bias[e]
        out.index_add_(0, tok, (y * weights[start : start + n, None]).to(out.dtype))
        start += n
    return out


@analog_expert_group_op.register_fake
def _(hidden, *args, **kwargs):
    return torch.empty_like(hidden)
