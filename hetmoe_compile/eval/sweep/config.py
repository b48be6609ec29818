"""A sweep's configuration as one picklable value (:class:`SweepConfig`), what its units' numbers depend on
(:meth:`SweepConfig.settings`, bound by the resumable store), and the module-level factory every worker builds its
:class:`~.jobs.SweepContext` with (:func:`sweep_context`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ...analog.config import AnalogConfig, analog_config
from ...base.errors import HetMoEError, check_choice, check_seed
from ...base.version import __version__
from ...cost.params import CostParams
from ...models.loader import LoadOptions
from ...peers.registry import PeerOptions
from ...placement.policy import SCOPES
from ..under_noise import EvalSpec, Prepared, read_inputs
from .jobs import SweepContext

SELECTION = ("fractions", "selectors", "seeds", "peers", "ablation")
"""Fields that choose which units run, not what a unit computes: a resumed sweep may change them."""
FILES = ("calibration_text", "ppl_text", "input_ranges", "tasks_dir")
"""Fields naming files, recorded in the settings by their contents (sha256), wherever the file is."""


def _pcm() -> AnalogConfig:
    return analog_config("pcm")


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep measures and how: the model (a path or hub id, loaded by each worker with ``load``), the
    digital ``fractions`` x ``selectors`` (``scope``: per layer or over all layers), the dense-on-analog
    ``ablation`` rows, ``peers`` (with ``peer_options``), the ``analog`` configuration, what to measure (as
    :func:`hetmoe_compile.evaluate`: ``ppl_text``, ``tasks``, ``seeds`` hardware instances, ``times`` since
    programming, routing diagnostics on ``routing_tokens``), calibration text (a file, first
    ``calibration_tokens`` tokens) for the data-driven selectors and ROMER, ``input_ranges`` (a file) for constant
    noise management, ``cost_params`` for the energy column and ``seed`` for the random and measured selectors.
    Picklable: worker processes and Ray actors receive it whole."""

    model: str
    fractions: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0)
    selectors: tuple[str, ...] = ("max-neuron-norm", "router-norm", "random")
    analog: AnalogConfig = field(default_factory=_pcm)
    ablation: bool = True
    scope: str = "per-layer"
    peers: tuple[str, ...] = ()
    peer_options: PeerOptions = field(default_factory=PeerOptions)
    calibration_text: str | None = None
    calibration_tokens: int = 8192
    ppl_text: str | None = None
    ppl_tokens: int | None = None
    tasks: tuple[str, ...] = ()
    tasks_dir: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    seeds: int = 3
    batch_size: int = 8
    times: tuple[float, ...] | None = None
    routing_tokens: int = 2048
    input_ranges: str | None = None
    cost_params: CostParams = field(default_factory=CostParams)
    seed: int = 0
    load: LoadOptions = field(default_factory=LoadOptions)

    def __post_init__(self) -> None:
        for name in ("fractions", "selectors", "peers", "tasks"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise HetMoEError(f"{name} must be a list, got the string {value!r}; write [{value!r}]")
            object.__setattr__(self, name, tuple(value))
        if self.times is not None:
            object.__setattr__(self, "times", tuple(float(t) for t in self.times))
        for name in ("calibration_text", "ppl_text", "input_ranges", "tasks_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        object.__setattr__(self, "model", str(self.model))
        if not self.fractions:
            raise HetMoEError("fractions is empty; give digital fractions such as [0, 0.25, 1]")
        for f in self.fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 <= f <= 1.0) or math.isnan(f):
                raise HetMoEError(f"fractions: {f!r} is not a fraction in [0, 1]")
        object.__setattr__(self, "fractions", tuple(sorted({float(f) for f in self.fractions})))
        if not self.selectors:
            raise HetMoEError("selectors is empty; give selector names such as ['max-neuron-norm']")
        check_choice(self.scope, "scope", SCOPES)
        check_seed(self.seed)
        for name in ("routing_tokens", "calibration_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "routing_tokens" else 1):
                raise HetMoEError(f"{name}={value!r} must be an integer >= {0 if name == 'routing_tokens' else 1}")
        for name, kind in (("analog", AnalogConfig), ("peer_options", PeerOptions), ("cost_params", CostParams)):
            if not isinstance(getattr(self, name), kind):
                raise HetMoEError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.load, LoadOptions):
            raise HetMoEError(f"load must be a LoadOptions, got {type(self.load).__name__}")
        self.load.check()

    def spec(self) -> EvalSpec:
        """What each unit measures (several ``times``: every metric at each)."""
        several = list(self.times) if self.times and len(self.times) > 1 else None
        return EvalSpec(
            ppl_path=self.ppl_text,
            ppl_tokens=self.ppl_tokens,
            tasks=list(self.tasks),
            tasks_dir=self.tasks_dir,
            limit=self.limit,
            seeds=self.seeds,
            batch_size=self.batch_size,
            num_fewshot=self.num_fewshot,
            times=several,
        )

    def analog_config(self) -> AnalogConfig:
        """``analog`` at the first of ``times`` (every time checked to be a valid configuration)."""
        cfg = self.analog
        if self.times:
            cfg = replace(cfg, t_inference=self.times[0])
            for t in self.times:  # a device may have fits at some times only
                replace(cfg, t_inference=t)
        return cfg

    def settings(self) -> dict:
        """What a unit's numbers depend on, for the resumable store: every field but those that only select
        units, files by their contents (sha256), a local model by its full path, and this version."""
        from .store import file_digest

        skip = set(SELECTION)
        out: dict = {}
        for f in fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            if f.name in FILES and value is not None:
                value = "sha256:" + file_digest(Path(value))
            elif f.name == "model" and Path(value).is_dir():
                value = str(Path(value).resolve())
            elif f.name == "analog":  # by field, so a difference names the field
                out.update(value.to_dict())
                continue
            elif hasattr(value, "to_dict"):
                value = value.to_dict()
            elif f.name == "peer_options":
                value = asdict(value)
            elif f.name == "load":  # auto resolved: the device the numbers come from
                value = {
                    k: v if v is None or isinstance(v, (int, float, dict)) else str(v) for k, v in asdict(value).items()
                }
                value["device"] = self.load.resolved_device()
            out[f.name] = value
        out["version"] = __version__
        return out


def sweep_context(config: SweepConfig, device: str | None = None, prepared: Prepared | None = None) -> SweepContext:
    """A worker's :class:`~.jobs.SweepContext`: the model of ``config`` loaded (on ``device`` when given), its
    calibration, routing reference, input ranges and cost model. Worker processes and Ray actors call it with
    ``config`` pickled (``functools.partial(sweep_context, config)``); a serial sweep passes what it has read."""
    from ...analog.input_ranges import prepare_input_ranges
    from ...compose.pipeline import routing_frequencies
    from ...models import load_tokenizer
    from ...models.calibration import calibration_from_text, read_calibration_text
    from ...models.identity import model_identity
    from ...models.recognize import recognize
    from ...peers.registry import check_peer_options, check_peers
    from ..evaluate import routing_record
    from ..routing_diagnostics import routing_reference
    from .plan import sweep_cost_fn

    cfg, spec = config.analog_config(), config.spec()
    prepared = prepared or read_inputs(spec)
    peers = check_peers(list(config.peers), config.calibration_text is not None, combined=False)
    tokenizer = load_tokenizer(config.model)
    load = config.load if device is None else replace(config.load, device=device, device_map=None)
    calibration = None
    if config.calibration_text is not None:
        text = read_calibration_text(config.calibration_text)
        calibration = calibration_from_text(
            tokenizer, text, max_tokens=config.calibration_tokens, source=config.calibration_text
        )
    model = load.load(config.model)
    info = recognize(model)
    check_peer_options(peers, info, config.peer_options)
    if config.routing_tokens and prepared.text is not None and prepared.routing is None:
        prepared.routing = routing_reference(
            model, info, tokenizer, prepared.text, config.routing_tokens, spec.batch_size, str(spec.ppl_path)
        )
    ranges = prepare_input_ranges(model, info, cfg, config.input_ranges, calibration)
    cost_fn = sweep_cost_fn(config.cost_params, cfg, routing_frequencies(model, info, calibration))
    identity = {
        "model": model_identity(model, info, config.model),
        "input_ranges": ranges,
        "routing_reference": routing_record(prepared),
    }
    return SweepContext(
        model=model,
        info=info,
        tokenizer=tokenizer,
        cfg=cfg,
        spec=spec,
        prepared=prepared,
        selectors=list(config.selectors),
        calibration=calibration,
        peer_options=config.peer_options,
        cost_fn=cost_fn,
        scope=config.scope,
        identity=identity,
    )
