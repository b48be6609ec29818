"""Batched log-likelihood of continuations given contexts (lm-evaluation-harness ``loglikelihood`` requests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import HetMoEError
from .common import encode, max_positions, model_device


class LogLikelihood(NamedTuple):
    """Summed log-probability of a continuation's tokens, and whether greedy decoding would produce exactly them."""

    logprob: float
    is_greedy: bool
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval does.

    Trailing whitespace of the context moves to the continuation; the pair is tokenised as one string and split
    after the context's own tokens, so a merge across the boundary stays with the continuation (should the pair's
    tokens not start with the context's, the continuation is tokenised alone). An empty context becomes the
    tokenizer's BOS (else EOS) token.
    """
    stripped = context.rstrip()
    continuation, context = context[len(stripped) :] + continuation, stripped
    if not context:
        prefix = getattr(tokenizer, "bos_token_id", None)
        prefix = getattr(tokenizer, "eos_token_id", None) if prefix is None else prefix
        if prefix is None:
            raise HetMoEError("empty context and the tokenizer has no BOS/EOS token to start from; give a context")
        context_ids, continuation_ids = [prefix], encode(tokenizer, continuation)
    else:
        context_ids = encode(tokenizer, context)
        whole = encode(tokenizer, context + continuation)
        continuation_ids = whole[len(context_ids) :]
        if whole[: len(context_ids)] != context_ids or not continuation_ids:  # a merge across the boundary
            continuation_ids = encode(tokenizer, continuation)
    if not continuation_ids:
        raise HetMoEError(f"continuation {continuation!r} has no tokens; every choice needs some text to score")
    return context_ids, continuation_ids


def score_token_pairs(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    desc: str = "log-likelihood",
) -> list[LogLikelihood]:
    """:class:`LogLikelihood` of each ``(context_ids, continuation_ids)``, batched with right padding.

    Requests run longest first (less padding, and memory trouble shows at once); inputs longer than ``max_length``
    (default: the model's max positions) are truncated on the left. One forward per batch.
    """
    if batch_size < 1:
        raise HetMoEError(f"batch size {batch_size} is out of range; give a positive batch size")
    max_length = max_positions(model) if max_length is None else max_length
    device = model_device(model)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[LogLikelihood | None] = [None] * len(pairs)
    with torch.no_grad():
        for first in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            chunk = order[first : first + batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[-(max_length + 1) :][:-1] for i in chunk]
            width = max(len(x) for x in inputs)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, x in enumerate(inputs):
                ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, i in enumerate(chunk):
                n = len(inputs[row])
                target = torch.tensor(pairs[i][1][-n:], dtype=torch.long, device=logits.device)
                logprobs = logits[row, n - len(target) : n].float().log_softmax(-1)
                results[i] = LogLikelihood(
                    logprob=logprobs.gather(-1, target[:, None]).sum().item(),
                    is_greedy=bool((logprobs.argmax(-1) == target).all()),
                    tokens=len(target),
                )
    return results  # type: ignore[return-value]


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    desc: str = "log-likelihood",
) -> list[LogLikelihood]:
    """:class:`LogLikelihood` of each ``(context, continuation)`` string pair (see :func:`encode_pair`)."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    return score_token_pairs(model, pairs, batch_size, max_length, desc)
