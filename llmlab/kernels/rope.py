"""Rotary position embedding applied to q and k in place, in the rotate-half convention of model.py:

    out = x * cos + rotate_half(x) * sin,    rotate_half(x) = cat(-x2, x1)

with x1, x2 the two halves of the head. Written out per half, each pair (x1_i, x2_i) is rotated by
the angle of its position and frequency:

    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2

One program handles BLOCK_S positions of one (batch, head); both halves are loaded before either is
stored, which is what makes the in-place update safe.
"""

import torch
import triton
import triton.language as tl

from .. import model


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, seq, n_heads, stride_b, stride_h, stride_s,
                HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_s, pid_bh = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // n_heads, pid_bh % n_heads
    pos = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)                 # (BLOCK_S,) positions in this chunk
    cols = tl.arange(0, BLOCK_D)                                  # (BLOCK_D,) indices in one half
    # BLOCK_D is HALF rounded up to a power of two (tl.arange needs one); rows past seq are off too.
    mask = (pos[:, None] < seq) & (cols[None, :] < HALF)
    x1_ptrs = x_ptr + batch * stride_b + head * stride_h + pos[:, None] * stride_s + cols[None, :]
    cs_offsets = pos[:, None] * (2 * HALF) + cols[None, :]       # cos, sin: (seq, head_dim) contiguous
    x1 = tl.load(x1_ptrs, mask=mask).to(tl.float32)              # (BLOCK_S, BLOCK_D)
    x2 = tl.load(x1_ptrs + HALF, mask=mask).to(tl.float32)
    cos1 = tl.load(cos_ptr + cs_offsets, mask=mask).to(tl.float32)
    cos2 = tl.load(cos_ptr + cs_offsets + HALF, mask=mask).to(tl.float32)
    sin1 = tl.load(sin_ptr + cs_offsets, mask=mask).to(tl.float32)
    sin2 = tl.load(sin_ptr + cs_offsets + HALF, mask=mask).to(tl.float32)
    out_dtype = x_ptr.dtype.element_ty
    tl.store(x1_ptrs, (x1 * cos1 - x2 * sin1).to(out_dtype), mask=mask)
    tl.store(x1_ptrs + HALF, (x2 * cos2 + x1 * sin2).to(out_dtype), mask=mask)


def _rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    batch, n_heads, seq, head_dim = x.shape
    # Strides rather than contiguity: q straight out of the projection, view(...).transpose(1, 2),
    # is a strided view whose last dimension is still contiguous.
    assert x.stride(3) == 1 and head_dim % 2 == 0 and cos.shape == sin.shape == (seq, head_dim)
    block_s = min(64, triton.next_power_of_2(seq))
    grid = (triton.cdiv(seq, block_s), batch * n_heads)
    rope_kernel[grid](x, cos, sin, seq, n_heads, x.stride(0), x.stride(1), x.stride(2),
                      HALF=head_dim // 2, BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(head_dim // 2))


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (batch, n_heads, seq, head_dim), k (batch, n_kv_heads, seq, head_dim), rotated in place.

    cos, sin: (seq, head_dim) as model.rope_cos_sin returns them. Returns (q, k) for convenience.
    """
    cos, sin = cos.contiguous(), sin.contiguous()
    _rope_(q, cos, sin)
    _rope_(k, cos, sin)
    return q, k


def apply_rope_reference(q, k, cos, sin):
    """The model's own rotation, out of place."""
    return model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin)
