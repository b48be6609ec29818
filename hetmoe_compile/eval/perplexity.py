"""Token-level perplexity of a text, over strided windows of the model's context length."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..base.errors import HetMoEError
from ..base.io import read_text_file
from .common import encode, max_positions, model_device

MAX_DEFAULT_CONTEXT = 1024
MIN_SCORED_TOKENS = 32
"""The fewest predictions a reported perplexity (``eval --ppl``, ``sweep --ppl``) may rest on."""


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``, ``nll`` the mean negative log-likelihood (nats) over ``tokens`` scored tokens."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    context: int = 0
    stride: int = 0


def window_plan(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, scored)`` a window: ``ids[start:end]`` predict ``ids[start+1:end+1]``; the last ``scored`` count.

    Every token after the first is scored exactly once: the first window scores all its ``min(context, n-1)``
    predictions, each later one moves its end by ``stride`` and scores only the new ones, the ``context - stride``
    ids before them serving as unscored context. All windows have ``context`` inputs (as lm-eval's rolling
    windows), so with ``stride == context`` they do not overlap, except the last, which ends at the text's end.
    """
    predictions = num_tokens - 1
    ends = [min(context, predictions)]
    while ends[-1] < predictions:
        ends.append(min(ends[-1] + stride, predictions))
    return [(max(0, end - context), end, end - (ends[i - 1] if i else 0)) for i, end in enumerate(ends)]


def _check_options(
    model: nn.Module, context: int | None, stride: int | None, max_tokens: int | None
) -> tuple[int, int]:
    limit = max_positions(model)
    context = min(limit, MAX_DEFAULT_CONTEXT) if context is None else context
    if not 1 <= context <= limit:
        raise HetMoEError(
            f"context {context} is out of range; give a window length between 1 and the model's {limit} positions"
        )
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise HetMoEError(f"stride {stride} is out of range; give a stride between 1 and the context length {context}")
    if max_tokens is not None and max_tokens < 2:
        raise HetMoEError(f"max_tokens {max_tokens} is too small; perplexity needs at least 2 tokens")
    return context, stride


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    context: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    source: str = "<text>",
) -> PerplexityResult:
    """Perplexity of ``text`` (first ``max_tokens`` tokens) under ``model``, each token after the first scored once.

    ``context`` defaults to the model's ``max_position_embeddings`` capped at 1024, ``stride`` to ``context``
    (non-overlapping windows); see :func:`window_plan`. A text shorter than one window is scored as one shorter window.
    """
    context, stride = _check_options(model, context, stride, max_tokens)
    if not text.strip():
        raise HetMoEError(f"{source}: text is empty; give a file with some natural-language text")
    ids = torch.tensor(encode(tokenizer, text)[:max_tokens], dtype=torch.long)
    if ids.numel() < 2:
        raise HetMoEError(f"{source}: text has {ids.numel()} token(s); perplexity needs at least 2, give a longer text")
    plan = window_plan(ids.numel(), context, stride)
    device = model_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for first in tqdm(range(0, len(plan), batch_size), desc="perplexity", unit="batch", leave=False):
            batch = plan[first : first + batch_size]
            inputs = torch.stack([ids[s:e] for s, e, _ in batch]).to(device)
            labels = torch.stack([ids[s + 1 : e + 1] for s, e, _ in batch]).to(device)
            logits = model(input_ids=inputs, use_cache=False).logits
            for row, (_, _, scored) in enumerate(batch):
                nll = F.cross_entropy(logits[row, -scored:].float(), labels[row, -scored:], reduction="sum")
                total += nll.item()
                count += scored
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, tokens=count, windows=len(plan), context=context, stride=stride)


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``; clear errors for a missing, non-UTF-8 or empty file."""
    return read_text_file(path, "text")


def perplexity_of_file(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    context: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
) -> PerplexityResult:
    """:func:`perplexity` of a UTF-8 text file (options are checked before the file is read)."""
    _check_options(model, context, stride, max_tokens)
    return perplexity(model, tokenizer, read_text(path), context, stride, max_tokens, batch_size, source=str(path))


def scored_tokens(tokenizer, text: str, max_tokens: int | None = None, source: str = "<text>") -> int:
    """How many tokens :func:`perplexity` scores in ``text`` (first ``max_tokens``); refuses fewer than
    :data:`MIN_SCORED_TOKENS` (a perplexity of a few tokens says nothing about the model)."""
    scored = max(0, len(encode(tokenizer, text)[:max_tokens]) - 1)
    if scored < MIN_SCORED_TOKENS:
        limit = f" (--ppl-tokens {max_tokens})" if max_tokens is not None else ""
        raise HetMoEError(
            f"{source}: {scored} token(s) would be scored{limit}; a perplexity needs at least {MIN_SCORED_TOKENS}, "
            "give a longer text or a larger --ppl-tokens"
        )
    return scored
