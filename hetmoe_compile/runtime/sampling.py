"""Next-token choice for :meth:`Runner.generate`: greedy, or seeded sampling with temperature, top-k and top-p.

The filters follow transformers' logits warpers in its order (temperature, then top-k, then top-p; top-p keeps the
smallest set of most likely tokens whose probability reaches ``top_p``, at least one), so that a distribution here
is the one ``model.generate(do_sample=True, ...)`` samples from. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..base.errors import HetMoEError, check_seed


@dataclass(frozen=True)
class Sampling:
    """``temperature`` > 0; ``top_k`` 0 = off; ``top_p`` in (0, 1], 1 = off; ``seed`` for the draws."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise HetMoEError(f"temperature must be a finite number > 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise HetMoEError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise HetMoEError(f"top_p must lie in (0, 1] (1: off), got {p!r}")
        check_seed(self.seed, "seed")


def probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution ``[batch, vocab]`` (float64) sampled from, given the last position's ``logits``."""
    z = np.asarray(logits, dtype=np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < z.shape[-1]:
        kth = np.partition(z, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(p, axis=-1, kind="stable")  # ascending, as transformers' TopPLogitsWarper
        sorted_p = np.take_along_axis(p, order, axis=-1)
        drop_sorted = np.cumsum(sorted_p, axis=-1) <= 1 - sampling.top_p
        drop_sorted[:, -1] = False  # the most likely token always stays
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(-1, keepdims=True)
    return p


class TokenChooser:
    """``chooser(logits [batch, vocab]) -> token ids [batch]``: argmax, or a draw from :func:`probabilities`
    with one seeded generator per call sequence (the same seed gives the same tokens)."""

    def __init__(self, sampling: Sampling | None) -> None:
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed) if sampling is not None else None

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.sampling is None or self.rng is None:
            return logits.argmax(-1).astype(np.int64)
        p = probabilities(logits, self.sampling)
        u = 1.0 - self.rng.random((p.shape[0], 1))  # in (0, 1]: a token of probability 0 is never drawn
        cdf = np.cumsum(p, axis=-1)
        return np.minimum((cdf < u * cdf[:, -1:]).sum(-1), p.shape[-1] - 1).astype(np.int64)
