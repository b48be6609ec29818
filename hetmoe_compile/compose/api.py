"""The Python API: ``analyze`` a model's experts, ``compile`` it to a placement, then simulate, report or export."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..analog.config import AnalogConfig, analog_config
from ..analog.input_ranges import InputRanges
from ..analog.simulate import restore_digital
from ..base.errors import HetMoEError, check_choice, check_seed
from ..cost.params import CostParams
from ..models.calibration import Calibration
from ..models.recognize import ModelInfo, recognize
from ..peers.registry import Applied, PeerOptions
from ..placement.placement import Placement, check_placement_matches
from ..placement.policy import PlacementPolicy
from ..scoring import Scores, check_selectors, score
from ..scoring import selectors as _registry
from ..transforms.canonicalize import canonicalize
from ..transforms.lowbit import quantize_digital_experts
from .pipeline import Analysis, analyze_checkpoint, analyze_model, place_scores, routing_frequencies

if TYPE_CHECKING:  # the exporter loads onnx: imported when export runs
    from ..export import ExportOptions

_HANDLE_ATTR = "_hetmoe_compiled"


@dataclass
class CompiledMoE:
    """A model placed on digital and analog hardware. ``model`` is canonical: each MoE layer holds a digital and
    an analog expert group; without :meth:`simulate` it computes exactly what the original model computes."""

    model: nn.Module
    info: ModelInfo
    placement: Placement
    analog: AnalogConfig
    quantization: dict | None = None
    """What ``digital_bits`` did: ``{"bits", "group_size", "experts": [per-expert error bounds and errors]}``."""
    peers: Applied | None = None
    """The peers applied (``peers.record``); :meth:`undo_peers` takes them back."""
    _handle: object = field(default_factory=object, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self.model, _HANDLE_ATTR, self._handle)  # the latest compile of the model owns it

    def _current(self) -> None:
        """Refuse to act through a handle a later :func:`compile` of the same model superseded."""
        if getattr(self.model, _HANDLE_ATTR, None) is not self._handle:
            raise HetMoEError(
                "this CompiledMoE is out of date: its model was compiled again with another placement; use the "
                "handle the latest hetmoe_compile.compile(model, ...) returned"
            )

    def report(self, graph: bool = False, verbose: bool = False) -> str:
        """Parameter share per device and digital experts per layer; with ``graph``, also ``torch.export`` the
        model and count graph nodes per device (``verbose``: every node with its device and reason)."""
        from ..graph.capture import export_placed
        from .report import placement_report

        self._current()
        gm = None
        if graph:
            self.restore()
            gm = export_placed(self.model, self.placement, self.info).graph_module
        return placement_report(self.placement, gm, verbose)

    def simulate(self, seed: int = 0, dense: str | None = None) -> nn.Module:
        """Put hardware instance ``seed`` of :attr:`analog` under the analog experts (in place; ``dense="analog"``
        also puts dense layers on tiles, the paper's ablation). Returns the model; :meth:`restore` undoes it."""
        from ..analog.simulate import simulate

        self._current()
        return simulate(self.model, self.analog, seed, dense or self.placement.policy.dense, self.info)

    def restore(self) -> nn.Module:
        """The ideal (digital-equivalent) model back after :meth:`simulate`."""
        from ..analog.simulate import restore_digital

        self._current()
        return restore_digital(self.model, self.info)

    def undo_peers(self) -> None:
        """Take back the peers :func:`compile` applied (ROMER, HPD, low-bit), leaving the placed model."""
        self._current()
        if self.peers is not None:
            self.peers.undo()
            self.peers = None

    def quantize_digital(self, bits: int, group_size: int = 128) -> list:
        """Quantise the digital experts' weights to INT8 or INT4, group-wise (in place; see
        :func:`hetmoe_compile.transforms.lowbit.quantize_digital_experts`); returns each expert's error bound and
        error."""
        from ..transforms.lowbit import quantize_digital_experts

        self._current()
        return quantize_digital_experts(self.model, bits, group_size, self.info)

    def export(
        self,
        directory: str | Path,
        options: ExportOptions | None = None,
        tokenizer=None,
        *,
        instance_seed: int | None = None,
        monolithic: bool | None = None,
        kv_cache: bool | None = None,
    ) -> Path:
        """Partitioned ONNX + ``manifest.json`` in ``directory``, as ``hetmoe-compile export`` writes it: every
        option of :class:`~hetmoe_compile.export.ExportOptions` (hardware instance ``instance_seed``, monolithic,
        ``kv_cache`` with ``genai_config.json``, ``ort_moe``, the cost model's ``cost`` parameters; its ``analog``
        defaults to :attr:`analog`), ``tokenizer`` saved beside. The keywords are shorthands for those fields
        when no ``options`` are given. Returns the manifest's path."""
        from ..export import ExportOptions, export_onnx

        shorthands: dict[str, Any] = {"instance_seed": instance_seed, "monolithic": monolithic, "kv_cache": kv_cache}
        given = {k: v for k, v in shorthands.items() if v is not None}
        if options is None:
            options = replace(ExportOptions(self.analog), **given)
        elif given:
            raise HetMoEError(f"give {', '.join(given)} in the ExportOptions, not beside them")
        if not isinstance(options, ExportOptions):
            raise HetMoEError(f"options must be an ExportOptions, got {type(options).__name__}")
        if options.instance_seed is not None:
            check_seed(options.instance_seed, "instance_seed")
        for name in ("kv_cache", "monolithic", "ort_moe"):
            if not isinstance(getattr(options, name), bool):
                raise HetMoEError(f"{name} must be True or False, got {getattr(options, name)!r}")
        if options.analog is None:
            options = replace(options, analog=self.analog)
        self._current()
        self.restore()
        return export_onnx(self.model, self.placement, directory, options, tokenizer)


def compile(
    model: nn.Module,
    policy: PlacementPolicy | None = None,
    analog: AnalogConfig | str | None = None,
    calibration: Calibration | None = None,
    source: str = "",
    *,
    placement: Placement | None = None,
    scores: Scores | None = None,
    cost_params: CostParams | None = None,
    digital_bits: int | None = None,
    group_size: int = 128,
    peers: Sequence[str] = (),
    peer_options: PeerOptions | None = None,
    quantization_seed: int = 0,
) -> CompiledMoE:
    """The one composer: place ``model``'s experts, canonicalise it in place, then optionally quantise its digital
    experts and apply peers. The CLI commands, sweeps and benchmarks build on it.

    - Placement: a given ``placement`` (checked against the model; ``source`` names where it came from in
      messages), else ``policy`` (default 25 % by
      max-neuron-norm) ranked by ``scores`` (computed with ``policy.selector`` when not given), or placed under
      the policy's budget with the cost model (``cost_params``) and the calibration text's measured routing.
    - ``analog``: an :class:`AnalogConfig` or a preset name (default ``"pcm"``); data-driven selectors and the
      ROMER peers need ``calibration`` (:func:`hetmoe_compile.models.calibration.calibration_from_text`).
    - ``digital_bits`` (8 or 4): group-wise integer digital experts (``group_size``); the record is
      :attr:`CompiledMoE.quantization`.
    - ``peers`` (names from :data:`hetmoe_compile.peers.registry.PEERS`, with ``peer_options``): applied after
      placement; :meth:`CompiledMoE.undo_peers` takes them back.
    """
    from ..peers.registry import PeerContext, apply_peers, check_peers

    _check_arg("model", model, nn.Module, "a loaded model (hetmoe_compile.load_model(path) loads one)")
    _check_arg("policy", policy, PlacementPolicy, "e.g. PlacementPolicy(digital_fraction=0.25)", optional=True)
    _check_arg("analog", analog, (AnalogConfig, str), "a preset name such as 'pcm' or an AnalogConfig", optional=True)
    _check_arg("placement", placement, Placement, "Placement.load(path) reads a placement.json", optional=True)
    _check_arg("calibration", calibration, Calibration, "see calibration_from_text", optional=True)
    cfg = analog if isinstance(analog, AnalogConfig) else analog_config(analog or "pcm")
    names = check_peers(_names(peers, "peers") or [], calibration is not None) if peers else []
    if digital_bits is not None and {"int8", "int4"} & set(names):
        raise HetMoEError("digital_bits and the int8/int4 peers both quantise the digital experts: use one")
    info = recognize(model)
    restore_digital(model, info)  # compiling a simulated model again places the ideal one (a fresh handle)
    if placement is None:
        policy = policy or PlacementPolicy()
        if scores is None:
            check_selectors([policy.selector], calibration is not None)
            scores = score(model, info, policy.selector, calibration, policy.seed)
        frequencies = routing_frequencies(model, info, calibration) if policy.budget is not None else None
        placement = place_scores(model, info, scores, policy, source, cost_params, frequencies)
    else:
        check_placement_matches(placement, model, info, source or "placement")
    canonicalize(model, placement.devices(), info)
    compiled = CompiledMoE(model, recognize(model), placement, cfg)
    if digital_bits is not None:
        rows = quantize_digital_experts(model, digital_bits, group_size, compiled.info, seed=quantization_seed)
        compiled.quantization = {"bits": digital_bits, "group_size": group_size, "experts": [r.to_dict() for r in rows]}
    if names:
        compiled.peers = apply_peers(
            names, PeerContext(model, compiled.info, cfg, calibration, peer_options or PeerOptions())
        )
    return compiled


def analyze(
    model: nn.Module | str,
    selectors: Sequence[str] | None = None,
    calibration: Calibration | None = None,
    seed: int = 0,
    *,
    source: str | None = None,
    load: str = "auto",
    dtype: str | torch.dtype = "auto",
) -> Analysis:
    """Every selector's score for every routed expert (``Analysis.scores``, ``.spearman()``, ``.table()``;
    ``.save(path)`` writes ``scores.json``, ``.plot(path)`` the heatmap).

    ``model``: a loaded model, or a local checkpoint directory: with data-free selectors and no calibration its
    scores are read from the safetensors files one expert at a time (``load="meta"``, the model never loaded;
    ``"auto"`` does so when it can, ``"full"`` loads it with ``dtype``). By default all selectors the inputs allow
    run (data-driven ones only with ``calibration``). ``source`` names the model in the record (default: its path)."""
    import time

    _check_arg("model", model, (nn.Module, str, Path), "a loaded model or a checkpoint directory")
    _check_arg("calibration", calibration, Calibration, "see calibration_from_text", optional=True)
    check_seed(seed)
    names = _names(selectors, "selectors") or [
        n for n, s in _registry().items() if calibration is not None or not s.needs_calibration
    ]
    check_selectors(names, calibration is not None)
    if not isinstance(model, nn.Module):
        path = str(model)
        if scores_from_files(path, names, calibration is not None, load):
            model, analysis = analyze_checkpoint(path, names, seed, dtype)
            return _stamped(analysis, model, source or path, None, seed)
        model = _load_full(path, dtype)
        source = source or path
    info = recognize(model)
    forward = None
    if calibration is not None and any(_registry()[n].needs_calibration for n in names):
        start = time.perf_counter()
        calibration.routing(model, info)  # the forward the data-driven selectors share, timed on its own
        forward = time.perf_counter() - start
    analysis = analyze_model(model, names, calibration, seed, info)
    record = None
    if calibration is not None:
        record = {"source": calibration.source, "tokens": calibration.num_tokens, "forward_seconds": forward}
    return _stamped(analysis, model, source, record, seed)


def place(
    model: nn.Module | str,
    policy: PlacementPolicy | None = None,
    calibration: Calibration | None = None,
    *,
    scores: Scores | None = None,
    cost_params: CostParams | None = None,
    source: str | None = None,
    load: str = "auto",
    dtype: str | torch.dtype = "auto",
) -> Placement:
    """Place ``model``'s experts by ``policy`` (default 25 % by max-neuron-norm; a budget policy is costed with
    ``cost_params``) and attach the placement's cost per token (``placement.cost``, measured routing when
    ``calibration`` is given). Changes nothing in the model. ``model`` and ``load`` as in :func:`analyze`:
    a checkpoint directory is scored from its files when the selector is data-free. ``.save(path)`` writes
    ``placement.json``, as ``hetmoe-compile place`` does."""
    from ..cost import estimate_cost

    _check_arg("model", model, (nn.Module, str, Path), "a loaded model or a checkpoint directory")
    _check_arg("policy", policy, PlacementPolicy, "e.g. PlacementPolicy(digital_fraction=0.25)", optional=True)
    _check_arg("calibration", calibration, Calibration, "see calibration_from_text", optional=True)
    _check_arg("cost_params", cost_params, CostParams, "load_cost_params(path) reads a file", optional=True)
    policy = policy or PlacementPolicy()
    check_selectors([policy.selector], calibration is not None)
    if not isinstance(model, nn.Module):
        path = str(model)
        source = source or path
        if scores_from_files(path, [policy.selector], calibration is not None, load) and scores is None:
            model, analysis = analyze_checkpoint(path, [policy.selector], policy.seed, dtype)
            scores = analysis.scores[policy.selector]
        else:
            model = _load_full(path, dtype)
    source = source if source is not None else str(getattr(model, "name_or_path", ""))
    info = recognize(model)
    if scores is None:
        scores = score(model, info, policy.selector, calibration, policy.seed)
    frequencies = routing_frequencies(model, info, calibration)
    placement = place_scores(model, info, scores, policy, source, cost_params, frequencies)
    if placement.cost is None:
        placement.cost = estimate_cost(model, placement, cost_params, info=info, frequencies=frequencies).to_dict()
    return placement


def calibrate_input_ranges(
    model: nn.Module,
    calibration: Calibration,
    *,
    tile_size: int = 512,
    quantile: float | None = None,
    source: str | None = None,
) -> InputRanges:
    """Input ranges of every routed expert's matrices on ``calibration``'s tokens, for constant noise management
    (``noise_management="constant"``, the ``standard-hwa`` preset), stamped with the model's hash; ``.save(path)``
    writes the file ``hetmoe-compile calibrate-ranges`` writes. A model that is not canonical yet is canonicalised
    (all digital, numerics unchanged); a compiled one is calibrated as placed (restore it first if simulated)."""
    from ..analog.input_ranges import DEFAULT_QUANTILE
    from ..analog.input_ranges import calibrate_input_ranges as calibrate
    from ..ir.expert_group import HetExperts

    _check_arg("model", model, nn.Module, "a loaded model (hetmoe_compile.load_model(path) loads one)")
    _check_arg("calibration", calibration, Calibration, "see calibration_from_text")
    info = recognize(model)
    if not all(isinstance(model.get_submodule(l.experts), HetExperts) for l in info.moe_layers):
        canonicalize(model, None, info)
        info = recognize(model)
    quantile = DEFAULT_QUANTILE if quantile is None else quantile
    return calibrate(model, info, calibration, tile_size, quantile, source=source)


def _names(value: Sequence[str] | None, name: str) -> list[str] | None:
    """A list of names; one string is refused (it would be read as its letters)."""
    if value is None:
        return None
    if isinstance(value, str):
        raise HetMoEError(f"{name} must be a list of names, got the string {value!r}; write [{value!r}]")
    return list(value)


def scores_from_files(path: str, names: list[str], has_calibration: bool, load: str) -> bool:
    """Whether to score from the checkpoint's files without loading the model (``load``: auto, meta or full):
    data-free selectors, no calibration, a local safetensors checkpoint."""
    from ..scoring.checkpoint_scores import CHECKPOINT_SELECTORS

    check_choice(load, "load", ("auto", "full", "meta"))
    possible = not has_calibration and all(n in CHECKPOINT_SELECTORS for n in names)
    if load == "meta" and not possible:
        raise HetMoEError(
            f"load='meta' scores {', '.join(CHECKPOINT_SELECTORS)} without calibration text; drop the calibration "
            "and data-driven selectors, or load the model (load='full')"
        )
    if load == "auto":
        p = Path(path).expanduser()
        return possible and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())
    return load == "meta"


def _load_full(path: str, dtype) -> nn.Module:
    from ..models import load_model

    return load_model(path, dtype=dtype)


def _stamped(analysis: Analysis, model: nn.Module, source: str | None, calibration: dict | None, seed: int):
    from ..models.identity import model_identity

    source = source if source is not None else str(getattr(model, "name_or_path", ""))
    analysis.model = model_identity(model, analysis.info, source)
    analysis.calibration = calibration
    analysis.seed = seed
    return analysis


def _check_arg(name: str, value, kinds, hint: str, optional: bool = False) -> None:
    """A wrong type for a public argument is one line naming it and what to pass, not a traceback further in."""
    if (optional and value is None) or isinstance(value, kinds):
        return
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    want = " or ".join("torch.nn.Module" if k is nn.Module else k.__name__ for k in kinds)
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise HetMoEError(f"{name} must be {want}, got {type(value).__name__} {shown}; {hint}")
