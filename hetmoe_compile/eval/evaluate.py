"""``evaluate``: one placement (given, or by a policy) under simulated AIMC noise over several hardware instances,
as ``hetmoe-compile eval`` runs it; the :class:`Evaluation` is its ``results.json``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from ..analog.config import AnalogConfig, analog_config
from ..analog.input_ranges import InputRanges, check_input_ranges_args, prepare_input_ranges
from ..base.errors import HetMoEError, check_seed
from ..base.io import atomic_write_text, strict_json
from ..base.version import PRODUCER
from ..compose.api import compile as compile_model
from ..models.calibration import Calibration
from ..models.loader import LoadOptions
from ..models.recognize import recognize
from ..peers import PeerOptions, check_peers
from ..placement.placement import Placement
from ..placement.policy import PlacementPolicy
from ..scoring import check_selectors
from .under_noise import EvalSpec, Prepared, evaluate_under_noise, read_inputs


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: ``metrics`` (``{name: {"mean", "std", "values"}}`` over the hardware
    instances), the ``placement`` evaluated, and :meth:`to_dict`, the ``results.json`` document."""

    record: dict
    placement: Placement
    analog: AnalogConfig

    @property
    def metrics(self) -> dict[str, dict]:
        return self.record["metrics"]

    def to_dict(self) -> dict:
        return self.record

    def save(self, path: str | Path) -> Path:
        """Write ``results.json`` to ``path`` atomically; returns the path."""
        return atomic_write_text(Path(path), strict_json(self.record) + "\n")

    def plots(self, path: str | Path) -> list[Path]:
        """The figures ``eval`` writes beside ``path``: routing diagnostics per layer (``<stem>.routing.png``) and,
        with several times since programming, each metric against time (``<stem>.time.png``)."""
        from .plots import plot_against_time, plot_routing

        path, cfg = Path(path), self.analog
        source = self.placement.model.get("source", "")
        out = []
        if self.record["routing_reference"] is not None:
            title = f"{source}: routing under {cfg.preset} x{cfg.noise_scale:g}"
            out.append(plot_routing({"this placement": self.metrics}, path.with_suffix(".routing.png"), title))
        if self.record["t_inference"]:
            title = f"{source} under {cfg.preset} x{cfg.noise_scale:g}"
            out.append(plot_against_time({"this placement": self.metrics}, path.with_suffix(".time.png"), title))
        return out


def evaluate(
    model: nn.Module | str,
    placement: Placement | None = None,
    policy: PlacementPolicy | None = None,
    analog: AnalogConfig | str = "pcm",
    *,
    tokenizer=None,
    calibration: Calibration | None = None,
    ppl_text: str | Path | None = None,
    ppl_tokens: int | None = None,
    tasks: Sequence[str] = (),
    tasks_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seeds: int = 3,
    batch_size: int = 8,
    times: Sequence[float] | None = None,
    routing_tokens: int = 2048,
    input_ranges: InputRanges | str | Path | None = None,
    dense: str | None = None,
    digital_bits: int | None = None,
    group_size: int = 128,
    peers: Sequence[str] = (),
    peer_options: PeerOptions | None = None,
    seed: int = 0,
    source: str | None = None,
    load: LoadOptions | None = None,
) -> Evaluation:
    """Evaluate ``model`` placed by ``placement`` (checked against the model) or by ``policy`` under ``analog`` (an
    :class:`AnalogConfig` with any physics fields, or a preset name) over ``seeds`` hardware instances, each at
    every time of ``times`` (seconds since programming; default the config's ``t_inference``).

    Measures the perplexity of the text file ``ppl_text`` (first ``ppl_tokens`` tokens) and lm-eval ``tasks``
    (local jsonl files from ``tasks_dir``; ``limit`` documents, ``num_fewshot`` examples), with routing diagnostics
    against the clean model on the first ``routing_tokens`` tokens of the text (0: off). Constant noise management
    takes ``input_ranges`` (or calibrates them on ``calibration``). ``digital_bits``, ``peers`` and ``dense`` as in
    :func:`hetmoe_compile.compile`; ``seed`` seeds the random and measured selectors and the quantisation.

    ``model``: a loaded model (canonicalised in place, left digital), or a path or hub id loaded with ``load``
    after every argument and input file is checked, so a mistake costs no loading."""
    from .perplexity import scored_tokens
    from .routing_diagnostics import routing_reference

    if not isinstance(model, (nn.Module, str, Path)):
        raise HetMoEError(f"model must be a torch.nn.Module or a model path, got {type(model).__name__}")
    if (placement is None) == (policy is None):
        raise HetMoEError("give exactly one of placement (a Placement) and policy (a PlacementPolicy)")
    check_seed(seed)
    for name, value in (("tasks", tasks), ("peers", peers)):
        if isinstance(value, str):
            raise HetMoEError(f"{name} must be a list of names, got the string {value!r}; write [{value!r}]")
    if not isinstance(routing_tokens, int) or isinstance(routing_tokens, bool) or routing_tokens < 0:
        raise HetMoEError(f"routing_tokens={routing_tokens!r} must be an integer >= 0 (0 turns the diagnostics off)")
    cfg = analog if isinstance(analog, AnalogConfig) else analog_config(analog)
    several = list(times) if times is not None and len(times) > 1 else None
    if times is not None and len(times) == 1:
        cfg = replace(cfg, t_inference=float(times[0]))
    for t in several or []:  # every time is a valid configuration (a device may have fits at some times only)
        replace(cfg, t_inference=t)
    spec = EvalSpec(
        ppl_path=None if ppl_text is None else str(ppl_text),
        ppl_tokens=ppl_tokens,
        tasks=list(tasks),
        tasks_dir=None if tasks_dir is None else str(tasks_dir),
        limit=limit,
        seeds=seeds,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        times=several,
    )
    prepared = read_inputs(spec)
    names = check_peers(list(peers), calibration is not None) if peers else []
    if digital_bits is not None and {"int8", "int4"} & set(names):
        raise HetMoEError("digital_bits and the int8/int4 peers both quantise the digital experts: use one")
    if policy is not None:
        check_selectors([policy.selector], calibration is not None)
    ranges_given = check_input_ranges_args(cfg, input_ranges, calibration is not None)  # read once, early
    path = None if isinstance(model, nn.Module) else str(model)
    if tokenizer is None:
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(path or str(getattr(model, "name_or_path", "")))
    ppl_scored = None
    if prepared.text is not None:
        ppl_scored = scored_tokens(tokenizer, prepared.text, spec.ppl_tokens, str(spec.ppl_path))
    if path is not None:
        model = (load or LoadOptions()).load(path)
    assert isinstance(model, nn.Module)
    info = recognize(model)
    if routing_tokens and prepared.text is not None:  # the clean model, before any placement, peer or quantisation
        prepared.routing = routing_reference(
            model, info, tokenizer, prepared.text, routing_tokens, spec.batch_size, str(spec.ppl_path)
        )
    origin = None if input_ranges is None or isinstance(input_ranges, InputRanges) else str(input_ranges)
    ranges = prepare_input_ranges(model, info, cfg, ranges_given, calibration, origin)
    name = source if source is not None else (path or str(getattr(model, "name_or_path", "")))
    compiled = compile_model(
        model,
        policy,
        cfg,
        calibration,
        name,
        placement=placement,
        digital_bits=digital_bits,
        group_size=group_size,
        peers=names,
        peer_options=peer_options,
        quantization_seed=seed,
    )
    placed, info = compiled.placement, compiled.info
    dense = dense or placed.policy.dense
    has_analog = any(l.ids("analog") for l in placed.layers) or "hpd" in names
    metrics = evaluate_under_noise(model, info, tokenizer, cfg, spec, prepared, dense, has_analog)
    quant, applied = compiled.quantization, compiled.peers
    record = {
        "producer": PRODUCER,
        "model": placed.model,
        "policy": {**placed.policy.to_dict(), "dense": dense},
        "analog": cfg.to_dict(),
        "input_ranges": ranges,
        "seeds": spec.seeds,
        "ppl_text": spec.ppl_path,
        "ppl_tokens": ppl_scored,
        "ppl_max_tokens": spec.ppl_tokens,
        "tasks": spec.tasks,
        "limit": spec.limit,
        "num_fewshot": spec.num_fewshot,
        "metrics": metrics,
        "routing_reference": routing_record(prepared),
        "t_inference": spec.times,
        "lm_eval": prepared.lm_eval,
        "digital_quantization": quant,
        "peers": None if applied is None else applied.record,
    }
    return Evaluation(record, placed, cfg)


def routing_record(prepared: Prepared) -> dict | None:
    """What results say about the routing diagnostics' reference: its tokens and the clean load's entropy."""
    ref = prepared.routing
    if ref is None:
        return None
    return {"tokens": ref.tokens, "clean_load_entropy": {str(k): v for k, v in ref.clean_entropy().items()}}
