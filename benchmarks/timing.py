"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rounds(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Wall times of each of ``fns`` in each of ``repeat`` rounds, every function once per round in turn (after one
    warm-up each), so that the machine's drift between rounds falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of a time over the base's in the same round (see :func:`rounds`): the two ran moments
    apart, so the machine's drift between rounds cancels."""
    return statistics.median(a / b for a, b in zip(times, base))


def decode_per_token(
    generators: dict[str, Callable[[object, int], object]], prompts: list, n: int, repeat: int
) -> dict[str, list[list[float]]]:
    """Seconds per decoded token after each prompt, per round: ``(gen(prompt, 1 + n) - gen(prompt, 1)) / n``, so
    the prefill cancels. Every generator takes its turn in each of ``repeat`` rounds (after one warm-up round), so
    :func:`paired_ratios` can compare two of them round by round."""
    samples: dict[str, list[list[float]]] = {name: [[] for _ in prompts] for name in generators}
    for round_ in range(repeat + 1):
        for name, gen in generators.items():
            for i, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                gen(prompt, n + 1)
                t1 = time.perf_counter()
                gen(prompt, 1)
                t2 = time.perf_counter()
                if round_:  # round 0 warms up
                    samples[name][i].append(((t1 - t0) - (t2 - t1)) / n)
    return samples


def paired_ratios(samples: dict[str, list[list[float]]], name: str, base: str) -> list[float]:
    """:func:`paired_ratio` of ``name`` over ``base`` for each prompt of :func:`decode_per_token`'s samples."""
    return [paired_ratio(x, y) for x, y in zip(samples[name], samples[base])]
