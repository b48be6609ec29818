"""Router outputs on the calibration tokens, clean and under simulated AIMC noise (the passes ROMER fits on).

One forward pass over the calibration windows with every analog group ideal (clean), then one per calibration
seed with that hardware instance programmed (``simulate(model, cfg, seed)``). Forward hooks on the router modules
record each MoE layer's router logits (the routers' first output) and how many routed (token, slot) pairs each
expert received (their third output). The model is left in the state it came in (see :func:`preserved_state`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ...analog.config import AnalogConfig
from ...analog.simulate import AnalogExpertGroup, AnalogLinear, restore_digital, simulate
from ...base.errors import HetMoEError
from ...ir.expert_group import HetExperts
from ...models.calibration import Calibration
from ...models.device_map import input_device
from ...models.recognize import ModelInfo
from ...transforms.hpd import HPDLinear


@dataclass
class RouterOutputs:
    """What the routers produced in one or more passes over the calibration tokens."""

    counts: dict[int, torch.Tensor]
    """MoE layer -> ``[E]`` routed (token, slot) pairs per expert, summed over the passes."""
    logits: dict[int, torch.Tensor] | None
    """MoE layer -> ``[passes * T, E]`` float32 router logits (CPU), or None when not kept."""

    def frequencies(self) -> dict[int, torch.Tensor]:
        """MoE layer -> ``[E]`` share of the routed (token, slot) pairs each expert received (sums to 1)."""
        return {i: c.double() / max(int(c.sum()), 1) for i, c in self.counts.items()}


def check_canonical(model: nn.Module, info: ModelInfo, caller: str) -> None:
    """ROMER passes work on a canonical, placed model (each experts module a :class:`HetExperts`)."""
    for layer in info.moe_layers:
        if not isinstance(model.get_submodule(layer.experts), HetExperts):
            raise HetMoEError(
                f"{caller}() needs a canonical, placed model ({layer.experts} is not a HetExperts): "
                "call canonicalize(model, placement.devices(), info) first"
            )


def check_inputs(calibration: Calibration | None, seeds: Sequence[int], batch_size: int, caller: str) -> list[int]:
    """Validate the calibration tokens, seeds and batch size; returns the seeds as a list."""
    if calibration is None or calibration.input_ids.numel() == 0:
        raise HetMoEError(
            f"{caller}() needs calibration tokens, got none: build them with "
            "calibration_from_text(tokenizer, text) (CLI: --calib TEXTFILE)"
        )
    if calibration.input_ids.dim() != 2:
        raise HetMoEError(
            f"{caller}(): calibration input_ids must be [windows, length], got shape "
            f"{tuple(calibration.input_ids.shape)}; use calibration_from_text(tokenizer, text)"
        )
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise HetMoEError(f"{caller}() needs at least one calibration seed (hardware instance), e.g. seeds=(1000,)")
    if batch_size < 1:
        raise HetMoEError(f"{caller}(): batch_size must be >= 1, got {batch_size}")
    return seeds


def _dense_on_tiles(model: nn.Module) -> bool:
    """True if dense layers run on tiles (``simulate(dense="analog")``); the analog halves of HPD-split projections
    (``u_sigma`` under an ``HPDLinear``) are on tiles whatever ``dense`` is, so they do not count."""
    modules = dict(model.named_modules())
    return any(
        isinstance(m, AnalogLinear) and not isinstance(modules.get(n.rpartition(".")[0]), HPDLinear)
        for n, m in modules.items()
    )


@contextmanager
def preserved_state(model: nn.Module, info: ModelInfo) -> Iterator[None]:
    """Run a block that simulates and restores the model, then put it back as it came: digital, or simulated again
    with the same configuration and seed (re-programmed from the current weights; output-noise stream reset).

    A model simulated with dense modules on tiles but no analog expert group carries no seed; it comes back digital.
    """
    state = None
    for layer in info.moe_layers:
        het = model.get_submodule(layer.experts)
        group = het.groups["analog"] if isinstance(het, HetExperts) and "analog" in het.groups else None
        if isinstance(group, AnalogExpertGroup):
            state = (group.cfg, group.seed, "analog" if _dense_on_tiles(model) else "digital")
            break
    try:
        yield
    finally:
        if state is None:
            restore_digital(model, info)
        else:
            simulate(model, state[0], state[1], dense=state[2], info=info)


def router_outputs(
    model: nn.Module,
    info: ModelInfo,
    calibration: Calibration,
    cfg: AnalogConfig,
    seeds: Sequence[int],
    batch_size: int = 8,
    keep_logits: bool = True,
    desc: str = "ROMER calibration",
) -> tuple[RouterOutputs, RouterOutputs]:
    """``(clean, noisy)`` router outputs on the calibration tokens: clean from one pass with every analog group
    ideal; noisy pooled over one pass per seed in ``seeds`` (hardware instances of ``cfg``, dense modules digital).
    """
    ids = calibration.input_ids
    starts = list(range(0, ids.shape[0], batch_size))
    device = input_device(model)
    records: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}
    handles = []

    def make_hook(layer_index: int, num_experts: int):
        def hook(module, args, output):
            logits, indices = output[0], output[2]
            logit_list, counts = records[layer_index]
            counts += torch.bincount(indices.detach().reshape(-1).cpu(), minlength=num_experts)
            if keep_logits:
                logit_list.append(logits.detach().reshape(-1, num_experts).float().cpu())

        return hook

    def run_pass(bar) -> RouterOutputs:
        records.clear()
        records.update({l.index: ([], torch.zeros(l.num_experts, dtype=torch.long)) for l in info.moe_layers})
        with torch.no_grad():
            for start in starts:
                model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
                bar.update(1)
        return RouterOutputs(
            {i: c.clone() for i, (_, c) in records.items()},
            {i: torch.cat(lg) for i, (lg, _) in records.items()} if keep_logits else None,
        )

    for layer in info.moe_layers:
        router = model.get_submodule(layer.router)
        handles.append(router.register_forward_hook(make_hook(layer.index, layer.num_experts)))
    try:
        with (
            preserved_state(model, info),
            tqdm(total=len(starts) * (1 + len(seeds)), desc=desc, unit="batch", leave=False) as bar,
        ):
            restore_digital(model, info)
            clean = run_pass(bar)
            noisy_passes = []
            for seed in seeds:
                simulate(model, cfg, seed, info=info)
                noisy_passes.append(run_pass(bar))
    finally:
        for h in handles:
            h.remove()
    noisy = RouterOutputs(  # one pass or more (callers check the seeds); each pass kept its logits if asked to
        {i: cast(torch.Tensor, sum(p.counts[i] for p in noisy_passes)) for i in clean.counts},
        {i: torch.cat([cast(dict[int, torch.Tensor], p.logits)[i] for p in noisy_passes]) for i in clean.counts}
        if keep_logits
        else None,
    )
    for name, out in (("clean", clean), ("noisy", noisy)):
        if out.logits is not None and not all(bool(torch.isfinite(t).all()) for t in out.logits.values()):
            raise HetMoEError(
                f"router logits are not finite in the {name} calibration pass under preset "
                f"'{cfg.preset}'; check the analog configuration (noise scale, bounds)"
            )
    return clean, noisy
