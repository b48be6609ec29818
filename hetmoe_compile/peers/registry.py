"""The method's peers and companions as optional passes on a placed, canonical model: ROMER (router logit
recalibration, under-used expert replacement), HPD (SVD split of the LM head and attention output projections)
and low-bit digital experts. Each pass applies in place and hands back a record and an ``undo``.

``sweep --peers`` and ``eval --peers`` take their names from :data:`PEERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..base.errors import HetMoEError

if TYPE_CHECKING:  # the CLI reads the peer names without importing torch
    from torch import nn

    from ..analog.config import AnalogConfig
    from ..models.calibration import Calibration
    from ..models.recognize import ModelInfo


@dataclass
class PeerOptions:
    """Knobs of the peers (defaults: ROMER threshold 0.25 of the uniform share; HPD on the LM head and attention
    output projections at full rank; low-bit groups of 128)."""

    group_size: int = 128
    hpd_targets: tuple[str, ...] = ("lm_head", "attention_output")
    hpd_rank: int | float | None = None
    romer_threshold: float = 0.25
    romer_seeds: tuple[int, ...] | None = None
    """Hardware instances ROMER fits on (None: ``romer.DEFAULT_SEEDS``, disjoint from the evaluation seeds)."""
    batch_size: int = 8


@dataclass
class PeerContext:
    model: nn.Module
    info: ModelInfo
    cfg: AnalogConfig
    calibration: Calibration | None
    options: PeerOptions = field(default_factory=PeerOptions)


@dataclass
class Applied:
    """What a pass did (JSON-ready) and how to take it back."""

    record: dict
    undo: Callable[[], object]  # its result is ignored


@dataclass(frozen=True)
class Peer:
    name: str
    summary: str
    alone_fraction: float
    """Digital fraction of routed experts when the peer is evaluated alone (dense modules digital)."""
    needs_calibration: bool
    apply: Callable[[PeerContext], Applied]


def _romer_seeds(options: PeerOptions) -> tuple[int, ...]:
    from .romer import DEFAULT_SEEDS

    return DEFAULT_SEEDS if options.romer_seeds is None else options.romer_seeds


def _romer_replace(ctx: PeerContext) -> Applied:
    from .romer import replace_underused_experts, restore_replaced_experts

    o = ctx.options
    reps = replace_underused_experts(
        ctx.model,
        ctx.info,
        ctx.calibration,
        ctx.cfg,
        seeds=_romer_seeds(o),
        threshold=o.romer_threshold,
        batch_size=o.batch_size,
    )
    return Applied(
        {"replacements": [r.to_dict() for r in reps]}, lambda: restore_replaced_experts(ctx.model, ctx.info, reps)
    )


def _romer_recalibrate(ctx: PeerContext) -> Applied:
    from .romer import apply_router_calibration, fit_router_calibration, remove_router_calibration

    o = ctx.options
    rc = fit_router_calibration(
        ctx.model, ctx.info, ctx.calibration, ctx.cfg, seeds=_romer_seeds(o), batch_size=o.batch_size
    )
    apply_router_calibration(ctx.model, ctx.info, rc)
    return Applied({"router_calibration": rc.to_dict()}, lambda: remove_router_calibration(ctx.model, ctx.info))


def _romer(ctx: PeerContext) -> Applied:
    first = _romer_replace(ctx)  # calibrate the routers on the model as it will run
    second = _romer_recalibrate(ctx)

    def undo() -> None:
        second.undo()
        first.undo()

    return Applied({**first.record, **second.record}, undo)


def _hpd(ctx: PeerContext) -> Applied:
    from ..transforms.hpd import split_projections, unsplit_projections

    records = split_projections(ctx.model, ctx.info, targets=ctx.options.hpd_targets, rank=ctx.options.hpd_rank)
    return Applied({"projections": [r.to_dict() for r in records]}, lambda: unsplit_projections(ctx.model))


def _lowbit(bits: int) -> Callable[[PeerContext], Applied]:
    def apply(ctx: PeerContext) -> Applied:
        import torch

        from ..ir.expert_group import device_groups
        from ..transforms.lowbit import quantize_digital_experts
        from ..transforms.lowbit.digital_experts import QUANT_ATTR

        groups = [g for _, _, g in device_groups(ctx.model, ctx.info.moe_layers, "digital", "low-bit experts")]
        saved = [(g, g.gate_up.detach().clone(), g.down.detach().clone()) for g in groups]
        rows = quantize_digital_experts(ctx.model, bits, ctx.options.group_size, ctx.info)

        @torch.no_grad()
        def undo() -> None:
            for g, gate_up, down in saved:
                g.gate_up.copy_(gate_up)
                g.down.copy_(down)
                if hasattr(g, QUANT_ATTR):
                    delattr(g, QUANT_ATTR)

        return Applied(
            {"bits": bits, "group_size": ctx.options.group_size, "experts": [r.to_dict() for r in rows]}, undo
        )

    return apply


PEERS: dict[str, Peer] = {
    "romer": Peer(
        "romer", "ROMER: under-used analog experts replaced, then router logits recalibrated", 0.0, True, _romer
    ),
    "romer-recalibrate": Peer(
        "romer-recalibrate", "ROMER router logit recalibration only (percentile maps)", 0.0, True, _romer_recalibrate
    ),
    "romer-replace": Peer("romer-replace", "ROMER expert replacement only", 0.0, True, _romer_replace),
    "hpd": Peer("hpd", "HPD: LM head and attention output projections split, U·Σ analog, Vᵀ digital", 0.0, False, _hpd),
    "int8": Peer("int8", "INT8 group-wise digital experts", 1.0, False, _lowbit(8)),
    "int4": Peer("int4", "INT4 group-wise digital experts", 1.0, False, _lowbit(4)),
}
ORDER = ("int8", "int4", "hpd", "romer-replace", "romer-recalibrate", "romer")
"""Application order when several peers are combined: weights first, routing calibrated last (on the model as
it will run)."""


def check_peers(names: list[str], has_calibration: bool, combined: bool = True) -> list[str]:
    """Validate peer names and their needs. ``combined``: applied together, so they must not overlap; returned in
    application order (else in the order given)."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise HetMoEError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if combined and "int8" in names and "int4" in names:
        raise HetMoEError("peers int8 and int4 both quantise the digital experts: pick one")
    romer = [n for n in names if n.startswith("romer")]
    if combined and len(romer) > 1:
        raise HetMoEError(f"peers {', '.join(romer)} overlap: 'romer' is both of the others; pick one")
    need = [n for n in names if PEERS[n].needs_calibration]
    if need and not has_calibration:
        raise HetMoEError(f"peer(s) {', '.join(need)} fit on calibration text: pass --calib TEXTFILE")
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=ORDER.index) if combined else unique


def check_peer_options(names: list[str], info: ModelInfo, options: PeerOptions) -> None:
    """Fail before any evaluation on options a peer would refuse halfway through a sweep."""
    from ..transforms.hpd import resolve_rank
    from ..transforms.lowbit.groupwise import check_quant_args

    for name in names:
        if name in ("int8", "int4"):
            for layer in info.moe_layers:
                check_quant_args(
                    int(name[3:]),
                    options.group_size,
                    layer.hidden_size,
                    f"layer {layer.index}'s gate/up projections (hidden size)",
                )
                check_quant_args(
                    int(name[3:]),
                    options.group_size,
                    layer.intermediate_size,
                    f"layer {layer.index}'s down projections (expert width)",
                )
        if name == "hpd":  # every target's full rank is at most the hidden size
            resolve_rank(options.hpd_rank, info.moe_layers[0].hidden_size, "the HPD targets")


def apply_peers(names: list[str], ctx: PeerContext) -> Applied:
    """Apply peers in :data:`ORDER`; the returned ``undo`` takes them all back (in reverse)."""
    done: list[tuple[str, Applied]] = []
    try:
        for name in check_peers(names, ctx.calibration is not None):
            if name not in ("int8", "int4"):  # the low-bit peers touch only the (resident) digital expert groups
                from ..models.device_map import require_resident

                require_resident(ctx.model, f"the {name} peer")
            done.append((name, PEERS[name].apply(ctx)))
    except BaseException:
        for _, applied in reversed(done):
            applied.undo()
        raise

    def undo() -> None:
        for _, applied in reversed(done):
            applied.undo()

    return Applied({name: applied.record for name, applied in done}, undo)
