"""The first Triton kernel: out = x + y, element by element.

A kernel is written for ONE program; the launcher starts a grid of them. Program i handles the
BLOCK elements starting at i * BLOCK, so cdiv(n, BLOCK) programs cover the whole vector.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def vector_add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # The last program runs past the end when n is not a multiple of BLOCK: the mask switches those
    # lanes off, for the loads and the store alike.
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def vector_add(x: torch.Tensor, y: torch.Tensor, block: int = 1024) -> torch.Tensor:
    assert x.shape == y.shape and x.device == y.device
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    vector_add_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    return out


def vector_add_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y
