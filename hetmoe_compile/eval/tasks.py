"""Zero-shot task accuracy (lm-evaluation-harness style): multiple choice by log-likelihood, LAMBADA by greedy match."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..errors import HetMoEError
from .loglikelihood import loglikelihoods
from .task_loaders import MCExample, get_task, load_task

KINDS = ("multiple_choice", "greedy")


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equal maxima, as numpy's argmax


def evaluate_examples(
    model: nn.Module,
    tokenizer,
    examples: Sequence[MCExample],
    kind: str = "multiple_choice",
    batch_size: int = 8,
    desc: str = "log-likelihood",
) -> dict[str, float]:
    """Metrics over ``examples``, all requests batched together.

    ``multiple_choice``: ``acc`` picks the choice with the highest summed continuation log-likelihood, ``acc_norm``
    the highest log-likelihood per character of the choice. ``greedy``: ``acc`` is the share of examples whose
    single continuation is exactly the greedy one, token by token.
    """
    if kind not in KINDS:
        raise HetMoEError(f"unknown task kind '{kind}'; use one of: {', '.join(KINDS)}")
    if not examples:
        raise HetMoEError("no examples to evaluate; give at least one")
    results = loglikelihoods(model, tokenizer, [r for ex in examples for r in ex.requests()], batch_size, desc=desc)
    if kind == "greedy":
        return {"acc": sum(r.is_greedy for r in results) / len(results)}
    acc = acc_norm = 0
    start = 0
    for ex in examples:
        lls = [r.logprob for r in results[start : start + ex.num_choices]]
        start += ex.num_choices
        acc += _argmax(lls) == ex.label
        acc_norm += _argmax([ll / ex.choice_length(i) for i, ll in enumerate(lls)]) == ex.label
    return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    names: Sequence[str],
    tasks_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for each task in ``names`` (first ``limit`` examples each).

    Every task file is read before the first forward, so a bad name or file fails fast.
    """
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    if not names:
        raise HetMoEError("no tasks given; name at least one task")
    loaded = {name: load_task(name, tasks_dir, limit) for name in names}
    scores: dict[str, dict[str, float]] = {}
    for name in tqdm(names, desc="tasks", unit="task", leave=False):
        scores[name] = evaluate_examples(model, tokenizer, loaded[name], get_task(name).kind, batch_size, desc=name)
    return scores
