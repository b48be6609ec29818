"""Seed streams, and PCM programming noise on weight rows (aihwkit's ``PCMLikeNoiseModel`` physics).

Each row (one neuron, ``[out, in]`` convention) is mapped to conductances on its own scale (per-row weight
scaling), so a large neuron does not compress the others; noise is drawn from a seed that depends only on the
caller's stream key, so the same key always gives the same device.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base.errors import HetMoEError

OUT_NOISE_STREAM = 1 << 20
"""Stream key of an analog layer's output noise (kept apart from its weight-programming streams)."""


def stream_seed(*key: int) -> int:
    """A 63-bit seed that depends only on the integers in ``key`` (e.g. seed, layer, expert, matrix)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def program_rows(weight: torch.Tensor, seed: int, noise_scale: float = 1.0) -> torch.Tensor:
    """``weight [..., out, in]`` as programmed on PCM devices (programming noise only), in the weight's dtype.

    The fused PCM step of :mod:`.pcm_fused` (aihwkit's equations) on the rows scaled to abs-max 1."""
    from .pcm_fused import pcm_program

    if noise_scale < 0:
        raise HetMoEError(f"noise scale must be >= 0, got {noise_scale}")
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    noisy, _ = pcm_program((w / scale)[None], [seed], noise_scale, programming=True, drift=False, t_inference=1.0)
    return (noisy[0] * scale).to(weight.dtype)
