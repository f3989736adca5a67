"""The attention block's first kernel at decode: RMSNorm, the q/k/v projections, RoPE and the KV-cache write.

In the plain path these are five or more kernels (the norm, one matmul over [W_q; W_k; W_v], RoPE on q,
RoPE on k, two indexed copies into the cache), each a round trip through memory for a few KB. Here one
program computes a few rows of one head and finishes them:

    rows i and i + d/2 of head h       the two halves of every rotation pair (RoPE rotates x_i with x_{i+d/2})
    q heads                            rotated, written to q (batch, n_heads, head_dim)
    k heads                            rotated, written into the cache at the sequence's position pos[b]
    v heads                            written into the cache at pos[b]

The rotation, with c = cos(m theta_i), s = sin(m theta_i) at position m:
    out_i = x_i c - x_{i+d/2} s,      out_{i+d/2} = x_{i+d/2} c + x_i s
Positions come from a (batch,) tensor and the angles from a precomputed table, so nothing depends on
the step: the kernel can be replayed from a CUDA graph.
"""

import torch
import triton
import triton.language as tl

from . import dependent_launch
from .fused_matvec import load_weights, wait_for_previous_kernel


@triton.jit
def qkv_rope_cache_kernel(x_ptr, norm_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                          n_cols, eps, n_heads, n_kv_heads, max_seq_len,
                          HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    head, pair_block, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    pairs = pair_block * BLOCK_P + tl.arange(0, BLOCK_P)          # i in 0 .. d/2-1
    first = (head * HEAD_DIM + pairs).to(tl.int64)                 # rows of [W_q; W_k; W_v]
    x_ptr += seq * n_cols
    acc1 = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)          # rows i
    acc2 = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)          # rows i + d/2
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # rows i + d/2 as the "up" half of fused_matvec's GLU tile pair: half * n_cols elements further on
    first_tile = first[:, None] * n_cols + tl.arange(0, BLOCK_K)[None, :]
    w1, w2, g = load_weights(w_ptr, norm_ptr, first_tile, 0, pairs[:, None] >= 0, half, n_cols, True, True, BLOCK_K)
    wait_for_previous_kernel(PDL)                                  # x comes from the kernel before
    for start in tl.range(0, n_cols, BLOCK_K):                     # the norm folded in as in fused_matvec
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        squares += x * x
        x = x * g.to(tl.float32)
        acc1 += w1.to(tl.float32) * x[None, :]
        acc2 += w2.to(tl.float32) * x[None, :]
        w1, w2, g = load_weights(w_ptr, norm_ptr, first_tile, start + BLOCK_K, pairs[:, None] >= 0, half, n_cols,
                                 True, True, BLOCK_K)
    scale = tl.rsqrt(tl.sum(squares, axis=0) / n_cols + eps)
    acc1, acc2 = tl.sum(acc1, axis=1) * scale, tl.sum(acc2, axis=1) * scale
    rope_into_cache(acc1, acc2, head, pairs, seq, q_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr,
                    n_heads, n_kv_heads, max_seq_len, HEAD_DIM)


@triton.jit
def rope_into_cache(x1, x2, head, pairs, seq, q_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr,
                    n_heads, n_kv_heads, max_seq_len, HEAD_DIM: tl.constexpr):
    """Rows i (x1) and i + d/2 (x2), i in `pairs`, of one head of [q; k; v]: q and k rotated by the angle
    of the sequence's position, q written out, k and v into the cache at that position. Shared with the
    int4 kernel (fused_int4)."""
    half: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + seq)
    if head < n_heads + n_kv_heads:                                # q and k heads turn; v heads do not
        cos = tl.load(cos_ptr + pos * HEAD_DIM + pairs)
        sin = tl.load(sin_ptr + pos * HEAD_DIM + pairs)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    # never write past the cache, whatever pos holds
    in_bounds = pairs < tl.where((head < n_heads) | (pos < max_seq_len), half, 0)
    if head < n_heads:
        out = q_ptr + (seq * n_heads + head) * HEAD_DIM
    elif head < n_heads + n_kv_heads:
        out = k_cache_ptr + ((seq * n_kv_heads + head - n_heads) * max_seq_len + pos) * HEAD_DIM
    else:
        out = v_cache_ptr + ((seq * n_kv_heads + head - n_heads - n_kv_heads) * max_seq_len + pos) * HEAD_DIM
    tl.store(out + pairs, x1.to(q_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(out + half + pairs, x2.to(q_ptr.dtype.element_ty), mask=in_bounds)


def qkv_rope_cache(x: torch.Tensor, norm: torch.Tensor, eps: float, wqkv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_p: int | None = None, block_k: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x (batch, dim) -> q (batch, n_heads, head_dim); k and v written into k_cache/v_cache
    (batch, n_kv_heads, max_seq_len, head_dim) at pos (batch,). cos/sin: (positions, head_dim) tables."""
    batch, n_cols = x.shape
    _, n_kv_heads, max_seq_len, head_dim = k_cache.shape
    n_heads = wqkv.shape[0] // head_dim - 2 * n_kv_heads
    q = torch.empty(batch, n_heads, head_dim, dtype=x.dtype, device=x.device)
    pdl = dependent_launch(x.device)
    # from the same H200 sweep as fused_matvec.launch_config: two tiles of BLOCK_P rows per program
    short = n_cols <= 1024
    block_p = min(block_p or (2 if short else 8), head_dim // 2)
    block_k = block_k or (triton.next_power_of_2(n_cols) if short else 512)
    num_warps = num_warps or (2 if short else 4)
    qkv_rope_cache_kernel[(n_heads + 2 * n_kv_heads, head_dim // 2 // block_p, batch)](
        x, norm, wqkv, cos, sin, pos, q, k_cache, v_cache, n_cols, eps, n_heads, n_kv_heads, max_seq_len,
        HEAD_DIM=head_dim, BLOCK_P=block_p, BLOCK_K=block_k, PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    return q
