"""PCM programming noise on weight rows, with aihwkit's ``PCMLikeNoiseModel`` as the physics.

Each row (one neuron, ``[out, in]`` convention) is mapped to conductances on its own scale (per-row weight
scaling), so a large neuron does not compress the others; noise is drawn from a seed that depends only on the
caller's stream key, so the same key always gives the same device.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import HetMoEError


OUT_NOISE_STREAM = 1 << 20
"""Stream key of an analog layer's output noise (kept apart from its weight-programming streams)."""


def stream_seed(*key: int) -> int:
    """A 63-bit seed that depends only on the integers in ``key`` (e.g. seed, layer, expert, matrix)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _pcm_model(noise_scale: float):
    try:
        from aihwkit.inference import PCMLikeNoiseModel
    except ImportError as exc:  # pragma: no cover - aihwkit is installed by `make install`
        raise HetMoEError(
            "PCM programming noise needs aihwkit: pip install --no-deps aihwkit==1.1.0 (see the README)"
        ) from exc
    return PCMLikeNoiseModel(prog_noise_scale=noise_scale)


def program_rows(weight: torch.Tensor, seed: int, noise_scale: float = 1.0) -> torch.Tensor:
    """``weight [..., out, in]`` as programmed on PCM devices (programming noise only), in the weight's dtype."""
    if noise_scale < 0:
        raise HetMoEError(f"noise scale must be >= 0, got {noise_scale}")
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    model = _pcm_model(noise_scale)
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(seed)
        noisy, _ = model.apply_programming_noise(w / scale)
    return (noisy * scale).to(weight.dtype)
