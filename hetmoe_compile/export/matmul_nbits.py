"""Pack a ``[N, K]`` weight for ONNX Runtime's ``com.microsoft::MatMulNBits`` (weight-only INT4/INT8).

Layout: ``B [N, K / block, block * bits / 8]`` unsigned integers with the default zero point ``2^(bits-1)`` (INT4:
two per byte, low nibble first) and ``scales [N * K / block]``; the op computes ``A @ dequant(B).T``. The integers
are re-derived from the (already dequantised) weights with the same group-wise rule as
:func:`hetmoe_compile.lowbit.quantize_groupwise`, so they are exactly the ones PyTorch used.
"""
from __future__ import annotations

import numpy as np

from ..errors import HetMoEError


def check_block(k: int, block: int) -> None:
    if block < 16 or block & (block - 1) or k % block:
        raise HetMoEError(f"MatMulNBits needs a power-of-two group size >= 16 dividing {k}, got {block}")


def pack_matmul_nbits(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, scales)`` for ``w [N, K]``."""
    n, k = w.shape
    check_block(k, block)
    qmax = 2 ** (bits - 1) - 1
    groups = w.astype(np.float32).reshape(n, k // block, block)
    amax = np.abs(groups).max(-1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.round(groups / scale[..., None]), -qmax, qmax).astype(np.int16) + 2 ** (bits - 1)
    u = q.astype(np.uint8)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else u
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale.reshape(-1))
