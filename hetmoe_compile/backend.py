"""The ``torch.compile`` backend ``"hetmoe"`` (entry point group ``torch_dynamo_backends``).

    import hetmoe_compile
    hetmoe_compile.prepare(model)  # one expert-group op per MoE layer (numerics unchanged)
    model.forward = torch.compile(model.forward, backend="hetmoe", options={"digital_fraction": 0.25})

Dynamo hands the backend a GraphModule. The backend finds the expert-group nodes, places their experts
(:class:`SplitExpertGroupsPass`) and rewrites the analog groups into simulated AIMC ops
(:class:`RewriteAnalogPass`), the pass the ahead-of-time path uses. It returns the rewritten module's forward.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from torch import fx, nn

from .analog.config import AnalogConfig, analog_config
from .errors import HetMoEError
from .passes import RewriteAnalogPass, SplitExpertGroupsPass, is_expert_group
from .placement.policy import PlacementPolicy


@dataclass(frozen=True)
class BackendOptions:
    """``torch.compile(..., backend="hetmoe", options={...})`` keys and defaults."""

    digital_fraction: float = 0.25
    selector: str = "max-neuron-norm"
    scope: str = "per-layer"
    dense: str = "digital"
    overrides: dict | None = None
    noise: str = "pcm"
    noise_scale: float | None = None
    t_inference: float | None = None
    seed: int = 0

    @classmethod
    def parse(cls, options: dict | None) -> "BackendOptions":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise HetMoEError(f"unknown hetmoe backend option(s) {unknown}; valid options: {', '.join(known)}")
        return cls(**(options or {}))

    def policy(self) -> PlacementPolicy:
        policy = PlacementPolicy(self.digital_fraction, self.selector, self.scope, self.dense,
                                 dict(self.overrides or {}), self.seed)
        policy.validate()
        if policy.dense != "digital":
            raise HetMoEError("backend option dense='analog' (the ablation) is simulation-only: use "
                              "hetmoe_compile.compile(model, ...).simulate(seed, dense='analog')")
        return policy

    def analog(self) -> AnalogConfig:
        return analog_config(self.noise, self.noise_scale, self.t_inference)


def _looks_like_raw_moe(gm: fx.GraphModule) -> bool:
    names = [n.name for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
    return any("experts" in n and ("gate_up_proj" in n or "down_proj" in n) for n in names)


def hetmoe_backend(gm: fx.GraphModule, example_inputs: Sequence, options: dict | None = None) -> Callable:
    """Place and rewrite the expert groups of one Dynamo graph; returns the callable Dynamo runs."""
    opts = BackendOptions.parse(options)
    policy, cfg = opts.policy(), opts.analog()
    if not any(is_expert_group(n) for n in gm.graph.nodes):
        if _looks_like_raw_moe(gm):
            raise HetMoEError("the graph holds MoE experts but no hetmoe expert groups: call "
                              "hetmoe_compile.prepare(model) before torch.compile(..., backend='hetmoe')")
        return gm.forward  # a graph without routed experts (e.g. around a graph break) runs as captured
    SplitExpertGroupsPass(policy, example_inputs)(gm)
    if not cfg.is_ideal:
        RewriteAnalogPass(cfg, opts.seed, in_place=True)(gm)  # the split pass's copies are ours to program
        _drop_unused_weights(gm)
    return gm.forward


def _drop_unused_weights(gm: fx.GraphModule) -> None:
    """Free the split pass's copies of ideal analog weights once the programmed ones replaced them."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, module in gm.hetmoe_groups.named_modules(prefix="hetmoe_groups"):
        for key, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and f"{name}.{key}" not in used:
                setattr(module, key, None)


def prepare(model: nn.Module) -> nn.Module:
    """Route every MoE layer's experts through one ``hetmoe::expert_group`` op (in place; numerics unchanged), so
    that ``torch.compile(..., backend="hetmoe")`` sees one expert-group node per layer. Re-joins a split model."""
    from .canonicalize import canonicalize
    from .hpd import require_unsplit

    require_unsplit(model, "the torch.compile backend")
    return canonicalize(model, None)
