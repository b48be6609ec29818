"""Evaluate a placed model under simulated AIMC noise over several hardware instances (seeds): perplexity, and
tasks through lm-evaluation-harness (:mod:`~hetmoe_compile.eval.harness`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from ..analog.config import AnalogConfig
from ..analog.simulate import restore_digital, simulate
from ..base.errors import HetMoEError
from ..models.recognize import ModelInfo

CHARS_PER_TOKEN_BOUND = 16  # a generous bound, used to avoid tokenising a whole corpus for its first N tokens


@dataclass(kw_only=True)
class EvalSpec:
    """What to measure: perplexity of a text (first ``ppl_tokens`` tokens) and/or lm-eval tasks and groups
    (``limit`` documents each, ``num_fewshot`` examples in each prompt; local jsonl files from ``tasks_dir``, else
    lm-eval's own datasets)."""

    ppl_path: str | None = None
    ppl_tokens: int | None = None
    tasks: list[str] = field(default_factory=list)
    tasks_dir: str | None = None
    limit: int | None = None
    seeds: int = 3
    batch_size: int = 8
    num_fewshot: int | None = None
    times: list[float] | None = None  # several t_inference: every metric at each, on the same devices

    def validate(self) -> None:
        if self.seeds < 1:
            raise HetMoEError(f"seeds must be >= 1, got {self.seeds}")
        if self.times is not None:
            if not self.times or any(not (math.isfinite(t) and t > 0) for t in self.times):
                raise HetMoEError(f"t_inference: every time must be a finite number of seconds > 0, got {self.times}")
            if len(set(self.times)) != len(self.times):
                raise HetMoEError(f"t_inference: a time is listed twice in {self.times}")
        if not self.ppl_path and not self.tasks:
            raise HetMoEError("nothing to evaluate: pass --ppl TEXTFILE and/or --tasks NAME[,NAME]")
        if self.num_fewshot is not None and not self.tasks:
            raise HetMoEError("--num-fewshot applies to --tasks; add --tasks or drop it")


@dataclass
class Prepared:
    """Inputs read once and reused for every seed and every placement: the text, lm-eval's task index, and what
    lm-eval reported about its tasks (configs, versions; filled by the first evaluation)."""

    text: str | None
    harness: Any = None  # a HarnessTasks when there are tasks
    lm_eval: dict | None = None
    routing: Any = None  # a RoutingReference: routing diagnostics against the clean model (routing_diagnostics)


def read_inputs(spec: EvalSpec) -> Prepared:
    """Read the text and index the tasks (fails fast on bad names or files, before any model work)."""
    from . import read_text

    spec.validate()
    text = None
    if spec.ppl_path:
        text = read_text(spec.ppl_path)
        if spec.ppl_tokens:
            text = text[: spec.ppl_tokens * CHARS_PER_TOKEN_BOUND]
    harness = None
    if spec.tasks:
        from .harness import HarnessTasks

        harness = HarnessTasks(spec.tasks, spec.tasks_dir)
    return Prepared(text, harness)


def summarize(values: dict[str, list[float]]) -> dict[str, dict]:
    """``{metric: {"mean", "std", "values"}}`` (std over seeds, ddof 0)."""
    return {
        k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": [float(x) for x in v]}
        for k, v in values.items()
    }


def measure(model: nn.Module, tokenizer, spec: EvalSpec, prepared: Prepared) -> dict[str, float]:
    """One evaluation of the model as it is now: ``{"ppl": ..., "<task>/<metric>": ...}``."""
    from . import perplexity

    out: dict[str, float] = {}
    if prepared.text is not None:
        res = perplexity(
            model,
            tokenizer,
            prepared.text,
            max_tokens=spec.ppl_tokens,
            batch_size=spec.batch_size,
            source=str(spec.ppl_path),
        )
        out["ppl"] = res.ppl
    if prepared.harness is not None:
        from .harness import harness_metrics

        metrics, record = harness_metrics(
            model, tokenizer, prepared.harness, spec.limit, spec.num_fewshot, spec.batch_size
        )
        out.update(metrics)
        prepared.lm_eval = prepared.lm_eval or record
    return out


TIME_UNITS = (("y", 365 * 86400.0), ("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0))


def time_label(seconds: float) -> str:
    """``3600 -> "1h"``, ``31536000 -> "1y"``, ``90 -> "90s"``: the largest unit that divides the time."""
    for unit, size in TIME_UNITS:
        value = seconds / size
        if value >= 1 and value == int(value):
            return f"{int(value)}{unit}"
    return f"{seconds:.15g}s"


def time_key(seconds: float, metric: str) -> str:
    """The metric at one time since programming: ``t=1h/ppl``, ``t=1d/piqa/acc`` (the time leads, so a
    metric's own name stays its last part)."""
    return f"t={time_label(seconds)}/{metric}"


def split_time_key(key: str) -> tuple[str, str] | None:
    """``("1h", "ppl")`` for ``t=1h/ppl``; ``None`` for a key without a time."""
    if not key.startswith("t="):
        return None
    label, _, metric = key[2:].partition("/")
    return label, metric


def instance_count(cfg: AnalogConfig, spec: EvalSpec, has_analog: bool, dense: str = "digital") -> int:
    """Hardware instances worth measuring: ``spec.seeds``, or one when nothing is analog or the preset is ideal
    (every instance is identical then)."""
    return spec.seeds if (has_analog or dense == "analog") and not cfg.is_ideal else 1


def evaluate_instance(
    model: nn.Module,
    info: ModelInfo,
    tokenizer,
    cfg: AnalogConfig,
    spec: EvalSpec,
    prepared: Prepared,
    seed: int,
    dense: str = "digital",
) -> dict[str, float]:
    """Every metric of hardware instance ``seed`` of a canonical model (at each of ``spec.times``, keys
    :func:`time_key`; the routing diagnostics with ``prepared.routing``). The instance is programmed afresh before
    each time's measurement, so the result does not depend on what ran before; the model is left simulated (call
    :func:`~hetmoe_compile.analog.simulate.restore_digital` when done)."""
    times: list[float | None] = list(spec.times) if spec.times else [None]
    out: dict[str, float] = {}
    for t in times:
        simulate(model, cfg if t is None else replace(cfg, t_inference=t), seed, dense=dense, info=info)
        measured = measure(model, tokenizer, spec, prepared)
        if prepared.routing is not None:
            from .routing_diagnostics import routing_diagnostics

            measured.update(routing_diagnostics(model, info, prepared.routing, spec.batch_size))
        for k, v in measured.items():
            out[k if t is None else time_key(t, k)] = v
    return out


def check_finite(values: dict[str, float], cfg: AnalogConfig) -> None:
    """One line naming the first metric that is not finite (a configuration whose noise overflows)."""
    for k, v in values.items():
        if not math.isfinite(v):
            raise HetMoEError(f"metric {k} is not finite under {cfg.preset}; check the analog configuration")


def evaluate_under_noise(
    model: nn.Module,
    info: ModelInfo,
    tokenizer,
    cfg: AnalogConfig,
    spec: EvalSpec,
    prepared: Prepared,
    dense: str = "digital",
    has_analog: bool = True,
) -> dict[str, dict]:
    """Mean and std over the hardware instances (:func:`instance_count`) of a canonical model, each measured by
    :func:`evaluate_instance`. With ``spec.times``, instance ``seed`` is the same devices at every time (the same
    programming and drift draws, drifted further) and the same per-MVM noise stream."""
    values: dict[str, list[float]] = {}
    try:
        for seed in range(instance_count(cfg, spec, has_analog, dense)):
            measured = evaluate_instance(model, info, tokenizer, cfg, spec, prepared, seed, dense)
            check_finite(measured, cfg)
            for k, v in measured.items():
                values.setdefault(k, []).append(v)
    finally:
        restore_digital(model, info)
    return summarize(values)
