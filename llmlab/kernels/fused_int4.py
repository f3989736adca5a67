"""The decode step's int4 products with their neighbours fused in (kernels="fused-decode", weights="int4").

The same four kernels per layer as fused_matvec and fused_qkv do for float weights, built on the int4
GEMV (int4_gemv.int4_slice_sums, split-K merged by the last slice to arrive). What each fuses:

    NORM        RMSNorm of x before the product: x * g is what meets the weights; 1 / rms(x), one number
                per sequence, multiplies the finished sums (W (x g / rms) = (W (x g)) / rms), so no slice
                needs the whole x before it starts
    "residual"  y = W x + r                                              (W_o, W_down)
    "glu"       y_n = silu(W_gate x)_n * (W_up x)_n                      ([W_gate; W_up])
    "rope"      RoPE on q and k, then q out and k, v into the cache      ([W_q; W_k; W_v])

GLU and RoPE combine two outputs: gate n with up n, and row i of a head with row i + d/2 (the rotation
pair). The kernel layout puts each pair side by side (columns 2i and 2i + 1 of `words`, made once at
load by glu_layout and qkv_layout), so that both halves land in the same program, which splits its
sums into the two with one reshape. Only the finishing program (the last K-slice) runs the epilogue.

One program per (block of outputs, K-slice, sequence): each sequence of a batch reads the weights
again, which is right for batch 1 (decode) and costs bytes beyond it.
"""

import torch
import triton
import triton.language as tl

from . import arrival_counters, dependent_launch
from .fused_matvec import wait_for_previous_kernel
from .fused_qkv import rope_into_cache
from .int4_gemv import Int4Weights, gemv_config, int4_slice_sums, merge_split_k, prepare_int4, sm_count


@triton.jit
def fused_int4_kernel(x_ptr, norm_ptr, words_ptr, scales_ptr, offsets_ptr, y_ptr, residual_ptr,
                      cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr, partial_ptr, arrivals_ptr,
                      N, K, GROUPS_PER_SPLIT, eps, n_heads, n_kv_heads, max_seq_len,
                      GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPLIT_K: tl.constexpr, ASM: tl.constexpr, NORM: tl.constexpr, EPILOGUE: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    pid_n, pid_k, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    x_ptr += seq * K
    partial_ptr += seq * SPLIT_K * N
    arrivals_ptr += seq * tl.num_programs(0)
    ns = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    part = int4_slice_sums(x_ptr, norm_ptr, words_ptr, scales_ptr, offsets_ptr, ns, pid_k * GROUPS_PER_SPLIT,
                           GROUPS_PER_SPLIT, N, GROUP, GROUPS_PER_STEP, BLOCK_N, ASM, NORM, PDL)
    last, sums = merge_split_k(part, partial_ptr, arrivals_ptr, pid_n, pid_k, ns, N, SPLIT_K)
    if last:
        if NORM:
            sums *= inverse_rms(x_ptr, K, eps)
        if EPILOGUE == "residual":
            outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            sums += tl.load(residual_ptr + seq * N + outs, mask=outs < N, other=0.0).to(tl.float32)
            tl.store(y_ptr + seq * N + outs, sums.to(y_ptr.dtype.element_ty), mask=outs < N)
        else:
            first, second = tl.split(tl.reshape(sums, (BLOCK_N // 2, 2)))     # columns 2i and 2i + 1
            if EPILOGUE == "glu":
                outs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                y = first * tl.sigmoid(first) * second                      # silu(gate) * up
                tl.store(y_ptr + seq * (N // 2) + outs, y.to(y_ptr.dtype.element_ty), mask=outs < N // 2)
            else:
                head, column = pid_n * BLOCK_N // HEAD_DIM, pid_n * BLOCK_N % HEAD_DIM  # BLOCK_N divides HEAD_DIM
                pairs = column // 2 + tl.arange(0, BLOCK_N // 2)
                rope_into_cache(first, second, head, pairs, seq, y_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr,
                                v_cache_ptr, n_heads, n_kv_heads, max_seq_len, HEAD_DIM)


@triton.jit
def inverse_rms(x_ptr, K, eps):
    """1 / sqrt(mean(x^2) + eps) over the whole of x (K values, a few KB, from L2)."""
    squares = tl.zeros((1024,), dtype=tl.float32)
    for start in range(0, K, 1024):
        cols = start + tl.arange(0, 1024)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        squares += x * x
    return tl.rsqrt(tl.sum(squares, axis=0) / K + eps)


def _launch(x, weights: Int4Weights, y, epilogue: str, norm=None, eps=0.0, residual=None, rope=None, block_n=None):
    batch, K = x.shape
    N = weights.words.shape[1]
    if weights.words.shape[0] * 8 != K or not x.is_contiguous():
        raise ValueError(f"the fused int4 products take contiguous x (batch, K) and weights of K = 8 x words rows: "
                         f"x {tuple(x.shape)}, words {tuple(weights.words.shape)}")
    config_n, per_step, split_k, warps = gemv_config(N, K, weights.group_size, sm_count(x.device))
    block_n = min(config_n, block_n or config_n)
    assert not rope or y.shape[2] % block_n == 0, "a program's outputs lie within one head"
    n_blocks = triton.cdiv(N, block_n)
    partial = torch.empty(batch * split_k * N, device=x.device, dtype=torch.float32) if split_k > 1 else y
    arrivals = arrival_counters("fused_int4", x.device, batch * n_blocks) if split_k > 1 else y
    cos, sin, pos, k_cache, v_cache = rope or (x,) * 5
    n_heads, n_kv_heads, max_seq_len, head_dim = (y.shape[1], k_cache.shape[1], k_cache.shape[2], y.shape[2]) \
        if rope else (1, 1, 1, 2)
    pdl = dependent_launch(x.device)
    fused_int4_kernel[(n_blocks, split_k, batch)](
        x, norm if norm is not None else x, weights.words, weights.scales, weights.offsets, y,
        residual if residual is not None else y, cos, sin, pos, k_cache, v_cache, partial, arrivals,
        N, K, K // weights.group_size // split_k, eps, n_heads, n_kv_heads, max_seq_len,
        GROUP=weights.group_size, GROUPS_PER_STEP=per_step, BLOCK_N=block_n, SPLIT_K=split_k,
        ASM=x.device.type == "cuda", NORM=norm is not None, EPILOGUE=epilogue, HEAD_DIM=head_dim, PDL=pdl,
        num_warps=warps, launch_pdl=pdl)
    return y


def matvec(x: torch.Tensor, weights: Int4Weights, norm: torch.Tensor | None = None, eps: float = 0.0,
           glu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (batch, K) -> (batch, N): as fused_matvec.matvec, from int4 weights in the kernel layout; with
    glu, the weights are glu_layout's (gate and up interleaved) and the output has half their columns."""
    batch, N = x.shape[0], weights.words.shape[1]
    y = torch.empty(batch, N // 2 if glu else N, dtype=x.dtype, device=x.device)
    return _launch(x, weights, y, "glu" if glu else "residual", norm, eps, residual)


def qkv_rope_cache(x: torch.Tensor, norm: torch.Tensor, eps: float, weights: Int4Weights, cos: torch.Tensor,
                   sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """As fused_qkv.qkv_rope_cache, from qkv_layout's int4 weights: q (batch, n_heads, head_dim) returned,
    k and v written into the caches at pos."""
    batch = x.shape[0]
    _, n_kv_heads, _, head_dim = k_cache.shape
    n_heads = weights.words.shape[1] // head_dim - 2 * n_kv_heads
    q = torch.empty(batch, n_heads, head_dim, dtype=x.dtype, device=x.device)
    return _launch(x, weights, q, "rope", norm, eps, rope=(cos, sin, pos, k_cache, v_cache), block_n=head_dim)


def stacked(layers, columns: torch.Tensor | None = None) -> Int4Weights:
    """Int4Linear layers stacked along the outputs in the kernel layout, columns reordered by `columns`."""
    parts = [prepare_int4(layer.packed, layer.scales, layer.offsets, layer.group_size) for layer in layers]
    words, scales, offsets = (torch.cat([getattr(p, name) for p in parts], dim=1) for name in ("words", "scales", "offsets"))
    if columns is not None:
        columns = columns.to(words.device)
        words, scales, offsets = words[:, columns], scales[:, columns], offsets[:, columns]
    return Int4Weights(words.contiguous(), scales.contiguous(), offsets.contiguous(), layers[0].group_size)


def side_by_side(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[first[0], second[0], first[1], second[1], ...]: two index lists interleaved."""
    return torch.stack([first, second], dim=-1).flatten()


def qkv_layout(wq, wk, wv, head_dim: int) -> Int4Weights:
    """[W_q; W_k; W_v] with each head's rows i and i + d/2 side by side."""
    n_heads = (wq.out_features + wk.out_features + wv.out_features) // head_dim
    heads = torch.arange(n_heads)[:, None] * head_dim
    i = torch.arange(head_dim // 2)[None, :]
    return stacked([wq, wk, wv], side_by_side(heads + i, heads + i + head_dim // 2))


def glu_layout(w_gate, w_up) -> Int4Weights:
    """[W_gate; W_up] with gate n and up n side by side."""
    n = torch.arange(w_gate.out_features)
    return stacked([w_gate, w_up], side_by_side(n, n + w_gate.out_features))
