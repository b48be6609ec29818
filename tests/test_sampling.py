"""Sampling in the torch-free runtime: the distribution is transformers' (temperature, top-k, top-p warpers), draws
are seeded, and run's flags reach it."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.runtime import Sampling
from hetmoe_compile.runtime.sampling import TokenChooser, probabilities


def _logits(batch=3, vocab=50, seed=0):
    return np.random.default_rng(seed).normal(0, 2, (batch, vocab)).astype(np.float32)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.8, 10, 0.9), (2, 1, 1)]
)
def test_distribution_is_transformers_warpers(temperature, top_k, top_p):
    logits = _logits()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(torch.zeros(3, 1, dtype=torch.long), torch.tensor(logits, dtype=torch.float64))
    ref = torch.softmax(scores, -1).numpy()
    got = probabilities(logits, Sampling(temperature, top_k, top_p))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert ((got > 0).sum(-1) == (ref > 0).sum(-1)).all()


def test_draws_are_seeded_and_follow_the_distribution():
    logits = _logits(1, 8, seed=3)
    sampling = Sampling(temperature=1.0, top_k=6, seed=11)
    again = TokenChooser(Sampling(temperature=1.0, top_k=6, seed=11))
    choose, other = TokenChooser(sampling), TokenChooser(Sampling(temperature=1.0, top_k=6, seed=12))
    tiled = np.repeat(logits, 4000, axis=0)
    draws = choose(tiled)
    np.testing.assert_array_equal(draws, again(tiled))
    assert (draws != other(tiled)).any()
    freq = np.bincount(draws, minlength=8) / draws.size
    p = probabilities(logits, sampling)[0]
    assert (freq[p == 0] == 0).all()  # tokens outside the top 6 are never drawn
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p.max() / draws.size))  # ~4 sigma


def test_top_k_one_is_greedy():
    logits = _logits(4, 30)
    np.testing.assert_array_equal(TokenChooser(Sampling(top_k=1, seed=5))(logits), logits.argmax(-1))
    np.testing.assert_array_equal(TokenChooser(None)(logits), logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": 0}, "temperature must be a finite number > 0, got 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"top_p": 0}, r"top_p must lie in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ({"seed": -3}, "seed=-3 must be an integer >= 0"),
    ],
)
def test_bad_sampling_is_refused(kwargs, message):
    with pytest.raises(HetMoEError, match=message):
        Sampling(**kwargs)
