"""``hetmoe::analog_expert_group``: an expert group whose matrices run on simulated AIMC tiles.

Same interface and routing as ``hetmoe::expert_group`` (compute scales with routed tokens); each expert's
gate/up and down matrices are pre-programmed (:mod:`.instance`) and every MVM goes through the tiles.
Output noise is drawn from a generator seeded by ``rng_state``, which the op advances by one per call, so a
hardware instance's outputs are reproducible from its seed.
"""

from __future__ import annotations

import torch

from ..ir.expert_group import activate
from ..ir.grouped_routing import routed_slots, routing_plan, use_grouped
from .tiles import Periphery, dac, grouped_tile_mvm


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
    mats = (gate_up_weight, gate_up_scale, down_weight, down_scale, gate_up_bias, down_bias)
    act = (activation, act_name, alpha, limit)
    widths = (gate_up_weight.shape[-1], down_weight.shape[-1])
    sizes = (gate_up_weight.shape[-2] * widths[0], down_weight.shape[-2] * widths[1])
    routing = (hidden, top_k_index, top_k_weights, expert_ids, num_experts)
    ranges = (gate_up_range, down_range)
    if use_grouped(hidden, gate_up_weight.dtype, *widths, *sizes):
        return _grouped_analog(*routing, mats, act, io, gen, *ranges)
    return _per_expert_analog(*routing, mats, act, io, gen, *ranges)


Mats = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""An analog group's ``(gate_up_weight, gate_up_scale, down_weight, down_scale, gate_up_bias, down_bias)``."""


def _grouped_analog(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    mats: Mats,
    act: tuple[str, str, float, float],
    io: Periphery,
    gen: torch.Generator | None,
    gate_up_range: torch.Tensor | None = None,
    down_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """The grouped path (see :mod:`~hetmoe_compile.ir.grouped_routing`): every ``T*K`` pair, experts' offsets on the
    device, no host synchronisation."""
    plan = routing_plan(top_k_index, expert_ids, num_experts)
    y = _routed_rows(hidden, plan.token, plan.row, plan.ends, mats, act, io, gen, gate_up_range, down_range)
    return plan.combine(hidden, top_k_weights, y)


ROWS_ELEMENTS = {"cpu": 1 << 18}
"""The per-expert path's bound on rows x outputs of each step, per device type (default ``1 << 24``): consecutive
experts' rows are taken together up to it (an expert with more rows alone). On the CPU the bound keeps each
step's temporaries (1 MiB in float32) in the core's cache: on the reference model a forward with every effect on
took 2.07-2.31x the clean one in runs of 128 to 1,024 rows, against 2.54-2.59x with all of a layer's rows in one
step (benchmarks/RESULTS.md). Elsewhere it only bounds the temporaries of a large batch."""


def _per_expert_analog(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    mats: Mats,
    act: tuple[str, str, float, float],
    io: Periphery,
    gen: torch.Generator | None,
    gate_up_range: torch.Tensor | None = None,
    down_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-expert path: the group's own pairs with their counts on the host, one matmul per expert and tile,
    every other step over all rows at once (in runs of experts up to :data:`ROWS_ELEMENTS`)."""
    out = torch.zeros_like(hidden)
    token, flat_slot, counts = routed_slots(top_k_index, expert_ids, num_experts)
    if not token.numel():
        return out
    row = torch.repeat_interleave(
        torch.arange(len(counts), device=hidden.device),
        torch.tensor(counts, device=hidden.device),
        output_size=token.numel(),
    )
    weights = top_k_weights.reshape(-1)[flat_slot]
    gate_up_weight, down_weight = mats[0], mats[2]
    shared = dac(hidden, gate_up_weight.shape[2:], io) if gate_up_range is None else None
    budget = ROWS_ELEMENTS.get(hidden.device.type, 1 << 24) // max(gate_up_weight.shape[1], down_weight.shape[1])
    for lo, hi, chunk in _chunks(counts, max(1, budget)):
        tok = token[lo:hi]
        y = _routed_rows(hidden, tok, row[lo:hi], chunk, mats, act, io, gen, gate_up_range, down_range, shared)
        out.index_add_(0, tok, (y * weights[lo:hi, None]).to(out.dtype))
    return out


def _chunks(counts: list[int], max_rows: int) -> list[tuple[int, int, list[int]]]:
    """Runs of consecutive experts of at most ``max_rows`` rows (an expert with more alone): ``(first row, end row,
    the counts with every other expert at 0)``, empty runs left out."""
    runs: list[tuple[int, int, list[int]]] = []
    first, lo, hi = 0, 0, 0  # the current run: experts from `first`, rows [lo, hi)

    def close(end: int) -> None:
        if hi > lo:
            runs.append((lo, hi, [0] * first + counts[first:end] + [0] * (len(counts) - end)))

    for e, n in enumerate(counts):
        if hi > lo and hi - lo + n > max_rows:
            close(e)
            first, lo = e, hi
        hi += n
    close(len(counts))
    return runs


def _routed_rows(
    hidden: torch.Tensor,
    token: torch.Tensor,
    row: torch.Tensor,
    segments: torch.Tensor | list[int],
    mats: Mats,
    act: tuple[str, str, float, float],
    io: Periphery,
    gen: torch.Generator | None,
    gate_up_range: torch.Tensor | None,
    down_range: torch.Tensor | None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The experts' outputs ``[N, H]`` on the routed rows (``token [N]`` of each row, ``row [N]`` its local expert,
    rows sorted by expert): both matrices on the tiles, each step over every row at once (see
    :func:`~.tiles.grouped_tile_mvm` for ``segments``). ``shared``: every token's DAC levels (abs-max), if taken
    already."""
    gate_up_weight, gate_up_scale, down_weight, down_scale, gate_up_bias, down_bias = mats
    if gate_up_range is None:  # abs-max: a token routed to several experts enters the DACs with the same levels
        levels, nm = shared or dac(hidden, gate_up_weight.shape[2:], io)
        levels, nm = levels[:, token], nm[:, token]
    else:  # each row at its expert's ranges
        levels, nm = dac(hidden[token], gate_up_weight.shape[2:], io, gate_up_range[row].T)
    h = grouped_tile_mvm(levels, nm, gate_up_weight, gate_up_scale, row, segments, io, gen, hidden.shape[-1])
    h = h.to(hidden.dtype)
    if gate_up_bias is not None:
        h = h + gate_up_bias[row]
    h = activate(h, *act)
    levels, nm = dac(h, down_weight.shape[2:], io, None if down_range is None else down_range[row].T)
    y = grouped_tile_mvm(levels, nm, down_weight, down_scale, row, segments, io, gen, h.shape[-1])
    y = y.to(hidden.dtype)
    return y if down_bias is None else y + down_bias[row]


@analog_expert_group_op.register_fake
def _(hidden, *args, **kwargs):
    return torch.empty_like(hidden)
