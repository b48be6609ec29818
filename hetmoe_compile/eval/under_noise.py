"""Evaluate a placed model under simulated AIMC noise over several hardware instances (seeds)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from ..analog.config import AnalogConfig
from ..analog.simulate import restore_digital, simulate
from ..errors import HetMoEError
from ..models.recognize import ModelInfo

CHARS_PER_TOKEN_BOUND = 16  # a generous bound, used to avoid tokenising a whole corpus for its first N tokens


@dataclass
class EvalSpec:
    """What to measure: perplexity of a text (first ``ppl_tokens`` tokens) and/or tasks (``limit`` each)."""

    ppl_path: str | None = None
    ppl_tokens: int | None = None
    tasks: list[str] = field(default_factory=list)
    tasks_dir: str | None = None
    limit: int | None = None
    seeds: int = 3
    batch_size: int = 8

    def validate(self) -> None:
        if self.seeds < 1:
            raise HetMoEError(f"seeds must be >= 1, got {self.seeds}")
        if not self.ppl_path and not self.tasks:
            raise HetMoEError("nothing to evaluate: pass --ppl TEXTFILE and/or --tasks NAME[,NAME]")
        if self.tasks and not self.tasks_dir:
            raise HetMoEError("--tasks needs --tasks-dir DIR (a folder of <task>.jsonl files)")


@dataclass
class Prepared:
    """Inputs read once and reused for every seed and every placement."""

    text: str | None
    examples: dict[str, list]


def prepare(spec: EvalSpec) -> Prepared:
    """Read the text and task files (fails fast on bad names or files, before any model work)."""
    from . import load_task, read_text

    spec.validate()
    text = None
    if spec.ppl_path:
        text = read_text(spec.ppl_path)
        if spec.ppl_tokens:
            text = text[: spec.ppl_tokens * CHARS_PER_TOKEN_BOUND]
    examples: dict[str, list] = {}
    if spec.tasks:
        assert spec.tasks_dir is not None  # validate(): tasks need a tasks folder
        examples = {name: load_task(name, spec.tasks_dir, spec.limit) for name in spec.tasks}
    return Prepared(text, examples)


def summarize(values: dict[str, list[float]]) -> dict[str, dict]:
    """``{metric: {"mean", "std", "values"}}`` (std over seeds, ddof 0)."""
    return {
        k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": [float(x) for x in v]}
        for k, v in values.items()
    }


def measure(model: nn.Module, tokenizer, spec: EvalSpec, prepared: Prepared) -> dict[str, float]:
    """One evaluation of the model as it is now: ``{"ppl": ..., "<task>/<metric>": ...}``."""
    from . import evaluate_examples, get_task, perplexity

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
    for name, examples in prepared.examples.items():
        for metric, value in evaluate_examples(
            model, tokenizer, examples, get_task(name).kind, spec.batch_size, desc=name
        ).items():
            out[f"{name}/{metric}"] = value
    return out


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
    """Mean and std over ``spec.seeds`` hardware instances of a canonical model; one run when nothing is analog
    or the preset is ideal (every instance is identical then)."""
    seeds = spec.seeds if (has_analog or dense == "analog") and not cfg.is_ideal else 1
    values: dict[str, list[float]] = {}
    try:
        for seed in range(seeds):
            simulate(model, cfg, seed, dense=dense, info=info)
            for k, v in measure(model, tokenizer, spec, prepared).items():
                values.setdefault(k, []).append(v)
    finally:
        restore_digital(model, info)
    result = summarize(values)
    for k, stats in result.items():
        if not all(math.isfinite(x) for x in stats["values"]):
            raise HetMoEError(f"metric {k} is not finite under {cfg.preset}; check the analog configuration")
    return result
