"""The ``torch.compile`` backend ``"hetmoe"`` (entry point group ``torch_dynamo_backends``).

    model = AutoModelForCausalLM.from_pretrained(path)      # unmodified
    model.forward = torch.compile(model.forward, backend="hetmoe", options={"digital_fraction": 0.25})

Dynamo hands the backend a GraphModule. The backend replaces each inlined fused-experts computation by one
expert-group node (:class:`RecognizeExpertsPass`; a model prepared with :func:`prepare` already has them), places
the experts (:class:`SplitExpertGroupsPass`) and rewrites the analog groups into simulated AIMC ops
(:class:`RewriteAnalogPass`), the pass the ahead-of-time path uses. It returns the rewritten module's forward.
Constant noise management (``noise="standard-hwa"``) takes the ``input_ranges`` option (an
:class:`~hetmoe_compile.analog.input_ranges.InputRanges` or its file), else the ranges attached to the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import fx, nn
from torch._dynamo.exc import ShortenTraceback

from ..analog.config import AnalogConfig, analog_config
from ..analog.input_ranges import InputRanges, attached_input_ranges, check_ranges_model
from ..base.errors import HetMoEError, UnsupportedModelError, check_seed
from ..graph.passes import RecognizeExpertsPass, RewriteAnalogPass, SplitExpertGroupsPass, is_expert_group
from ..graph.passes.recognize_experts_pass import frame_resolver
from ..graph.passes.split_expert_groups_pass import SELECTORS
from ..models.recognize import recognize
from ..placement.placement import Placement
from ..placement.policy import PlacementPolicy
from .pipeline import place_model


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
    input_ranges: Any = None  # InputRanges or the path of an input-ranges file (constant noise management)

    @classmethod
    def parse(cls, options: dict | None) -> BackendOptions:
        """Options checked as the CLI checks its flags: names, types, ranges (one line naming the fix)."""
        if options is not None and not isinstance(options, dict):
            raise HetMoEError(f"hetmoe backend options must be a dict, got {type(options).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise HetMoEError(f"unknown hetmoe backend option(s) {unknown}; valid options: {', '.join(known)}")
        opts = cls(**(options or {}))
        number: tuple[type, ...] = (int, float)
        checks: tuple[tuple[str, tuple[type, ...], bool], ...] = (
            ("digital_fraction", number, False),
            ("noise_scale", number, True),
            ("t_inference", number, True),
            ("selector", (str,), False),
            ("scope", (str,), False),
            ("dense", (str,), False),
            ("noise", (str,), False),
            ("overrides", (dict,), True),
        )
        for name, kinds, optional in checks:
            value = getattr(opts, name)
            if (value is None and optional) or (isinstance(value, kinds) and not isinstance(value, bool)):
                continue
            want = "a number" if kinds is number else f"a {kinds[0].__name__}"
            raise HetMoEError(
                f"hetmoe backend option {name}={value!r} must be {want}" + (" or None" if optional else "")
            )
        check_seed(opts.seed, "hetmoe backend option seed")
        if opts.selector not in SELECTORS:
            raise HetMoEError(
                f"hetmoe backend option selector={opts.selector!r}: in a graph use one of "
                f"{', '.join(SELECTORS)}; the others need the whole model or calibration text "
                "(use hetmoe_compile.compile(model, ...))"
            )
        for key in opts.overrides or {}:
            if not isinstance(key, str):
                raise HetMoEError(f"hetmoe backend override key {key!r} must be a string 'LAYER:EXPERT'")
        if opts.input_ranges is not None and not isinstance(opts.input_ranges, (str, os.PathLike, InputRanges)):
            raise HetMoEError(
                f"hetmoe backend option input_ranges must be an InputRanges or a file path, got "
                f"{type(opts.input_ranges).__name__}"
            )
        opts.policy()
        opts.analog()
        return opts

    def ranges(self, model: object) -> InputRanges | None:
        """The input ranges of constant noise management: the option's (checked against ``model``, the compiled
        module: they must have been calibrated on it), else those attached to ``model``."""
        if self.input_ranges is None:
            return attached_input_ranges(model) if isinstance(model, nn.Module) else None
        ranges = self.input_ranges
        if not isinstance(ranges, InputRanges):
            ranges = InputRanges.load(ranges)
        if isinstance(model, nn.Module):
            check_ranges_model(ranges, model, "hetmoe backend option input_ranges")
        return ranges

    def policy(self) -> PlacementPolicy:
        policy = PlacementPolicy(
            self.digital_fraction, self.selector, self.scope, self.dense, dict(self.overrides or {}), self.seed
        )
        policy.validate()
        if policy.dense != "digital":
            raise HetMoEError(
                "backend option dense='analog' (the ablation) is simulation-only: use "
                "hetmoe_compile.compile(model, ...).simulate(seed, dense='analog')"
            )
        return policy

    def analog(self) -> AnalogConfig:
        return analog_config(self.noise, self.noise_scale, self.t_inference)


def _frame_locals() -> dict:
    """The locals of the frame Dynamo is compiling (the backend runs inside its translation)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    return dict(tx.f_locals) if tx is not None else {}


def _place_frame_model(model: object, policy: PlacementPolicy) -> Placement | None:
    """The composer's placement step (:func:`~hetmoe_compile.compose.pipeline.place_model`, what ``hc.compile`` places
    with) on the model Dynamo compiles, when the frame is a whole recognised model; it reads the weights and changes
    nothing. ``None`` for a frame inside a model (a graph break): the split pass then scores the graph's weights."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        return None
    try:
        info = recognize(model)
    except UnsupportedModelError:
        return None
    return place_model(model, policy, None, "", info)


class BackendError(HetMoEError, ShortenTraceback):
    """A :class:`HetMoEError` raised inside the backend. Dynamo wraps other exceptions of a backend in
    ``BackendCompilerFailed`` with its own traceback; this one reaches the caller as itself (catch
    ``hetmoe_compile.HetMoEError``), its message first."""

    def __init__(self, message: str) -> None:
        ShortenTraceback.__init__(self, message, first_useful_frame=None)


def hetmoe_backend(gm: fx.GraphModule, example_inputs: Sequence, options: dict | None = None) -> Callable:
    """Place and rewrite the expert groups of one Dynamo graph; returns the callable Dynamo runs."""
    try:
        return _compile_graph(gm, example_inputs, options)
    except BackendError:
        raise
    except HetMoEError as exc:
        raise BackendError(str(exc)) from exc


def _compile_graph(gm: fx.GraphModule, example_inputs: Sequence, options: dict | None) -> Callable:
    opts = BackendOptions.parse(options)
    policy, cfg = opts.policy(), opts.analog()
    frame = _frame_locals()
    gm = run_passes([RecognizeExpertsPass(frame_resolver(frame))], gm)
    if not any(is_expert_group(n) for n in gm.graph.nodes):
        return gm.forward  # a graph without routed experts (e.g. around a graph break) runs as captured
    passes: list = [SplitExpertGroupsPass(policy, example_inputs, _place_frame_model(frame.get("self"), policy))]
    if not cfg.is_ideal:
        ranges = opts.ranges(frame.get("self")) if cfg.noise_management == "constant" else None
        passes.append(RewriteAnalogPass(cfg, opts.seed, in_place=True, input_ranges=ranges))  # on the split's copies
    gm = run_passes(passes, gm)
    if not cfg.is_ideal:
        _drop_unused_weights(gm)
    return gm.forward


def run_passes(passes: list, gm: fx.GraphModule) -> fx.GraphModule:
    """Chain ``passes`` with ``torch.fx.passes.infra``'s :class:`PassManager` (each pass's ``PassResult`` feeds
    the next; the graph is linted after the chain); our errors reach the caller as themselves, not wrapped."""
    from torch.fx.passes.infra.pass_manager import PassManager

    try:
        result = PassManager(passes)(gm)
    except Exception as exc:  # the manager wraps a pass's error in a plain Exception naming the pass
        if isinstance(exc.__cause__, HetMoEError):
            raise exc.__cause__ from None
        raise
    out = result.graph_module
    assert isinstance(out, fx.GraphModule)
    out.graph.lint()
    return out


def _drop_unused_weights(gm: fx.GraphModule) -> None:
    """Free the split pass's copies of ideal analog weights once the programmed ones replaced them."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, module in gm.get_submodule("hetmoe_groups").named_modules(prefix="hetmoe_groups"):
        for key, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and f"{name}.{key}" not in used:
                setattr(module, key, None)


def prepare(model: nn.Module) -> nn.Module:
    """Route every MoE layer's experts through one ``hetmoe::expert_group`` op (in place; numerics unchanged).
    Optional before ``torch.compile(..., backend="hetmoe")``, which recognises a raw model's experts itself; useful
    for a model whose experts graph-break (``experts_implementation="eager"``). Re-joins a split model."""
    from ..transforms.canonicalize import canonicalize
    from ..transforms.hpd import require_unsplit

    require_unsplit(model, "the torch.compile backend")
    return canonicalize(model, None)
