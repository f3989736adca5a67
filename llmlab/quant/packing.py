"""Two 4-bit values in one byte.

PyTorch has no 4-bit dtype, so int4 weights q (N, K) with values 0..15 are stored as uint8 (N, K/2):

    packed[n, j] = q[n, 2j] | q[n, 2j + 1] << 4        low nibble: column 2j, high nibble: column 2j+1

Neighbouring columns share a byte, so one row's bytes are one row's weights in order. (GGUF's Q4_0
and Q4_1 pack differently: byte j of a 32-value block holds values j and j + 16.)
"""

from __future__ import annotations

import torch

from ..errors import LlmlabError


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in 0..15 -> (N, K/2) uint8."""
    if q.shape[-1] % 2:
        raise LlmlabError(f"int4 packing puts two columns in a byte: K must be even, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed (N, K/2) uint8 -> q (N, K) uint8 in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)   # (N, K/2, 2) -> (N, K)
