"""RMSNorm, y = x / sqrt(mean(x^2) + eps) * w, in fp32 whatever the storage dtype, as model.RMSNorm.

The fused-residual variant also does the block's residual add that comes just before the norm,

    h = x + residual          (what the next block's residual stream carries)
    y = RMSNorm(h)

so h is written once and read zero times more, instead of written by the add and read by the norm.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, residual_ptr, w_ptr, y_ptr, h_ptr, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row; the whole row (BLOCK >= n_cols) stays in registers between the
    # mean of squares and the scaling, so x is read from memory once.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols              # padding lanes load 0: they add nothing to the sum of squares
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the storage dtype before the norm reads it, exactly as torch's `x + residual`.
        h = (x + residual).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * n_cols + cols, h, mask=mask)
        x = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # divide by n_cols, not by BLOCK
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (x * inv_rms * w).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps):
    dim = x.shape[-1]
    assert weight.shape == (dim,)
    x2d = x.reshape(-1, dim).contiguous()                   # (rows, dim)
    y = torch.empty_like(x2d)
    h = torch.empty_like(x2d) if residual is not None else None
    residual2d = residual.reshape(-1, dim).contiguous() if residual is not None else None
    block = triton.next_power_of_2(dim)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16   # a few dozen values per thread
    rms_norm_kernel[(x2d.shape[0],)](x2d, residual2d, weight, y, h, dim, eps,
                                     HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps)
    return y.view(x.shape), (h.view(x.shape) if h is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., dim), weight (dim,) -> RMSNorm(x) (..., dim) in x's dtype."""
    return _launch(x, None, weight, eps)[0]


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual; returns (RMSNorm(h), h)."""
    assert x.shape == residual.shape and x.dtype == residual.dtype
    return _launch(x, residual, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rms_norm_residual_reference(x, residual, weight, eps: float = 1e-5):
    h = x + residual
    return rms_norm_reference(h, weight, eps), h
