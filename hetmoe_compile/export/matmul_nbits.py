"""Pack a ``[N, K]`` weight for ONNX Runtime's ``com.microsoft::MatMulNBits`` (weight-only INT4/INT8).

Layout: ``B [N, K / block, block * bits / 8]`` unsigned integers with the default zero point ``2^(bits-1)`` (INT4:
two per byte, low nibble first) and ``scales [N * K / block]``; the op computes ``A @ dequant(B).T``. The integers
are re-derived from the (already dequantised) weights by
:func:`hetmoe_compile.transforms.lowbit.quantize_groupwise`, so they are exactly the ones PyTorch used.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base.errors import HetMoEError
from ..transforms.lowbit.groupwise import quantize_groupwise


def check_block(k: int, block: int) -> None:
    if block < 16 or block & (block - 1) or k % block:
        raise HetMoEError(f"MatMulNBits needs a power-of-two group size >= 16 dividing {k}, got {block}")


def pack_matmul_nbits(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, scales)`` for ``w [N, K]``."""
    n, k = w.shape
    check_block(k, block)
    quant = quantize_groupwise(torch.from_numpy(np.array(w)), bits, block)  # a writable copy
    u = (quant.q.numpy().astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8).reshape(n, k // block, block)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else u
    return np.ascontiguousarray(packed), np.ascontiguousarray(quant.scale.numpy().reshape(-1))
