"""Int4 weight-only GEMV/GEMM for decode: y = x @ W.T with W stored as 4-bit integers.

Decoding one token multiplies each weight once by one activation, so its time is the time to read
the weights, and 4-bit weights are a quarter of the bytes of bf16 ones. The weights are dequantized
in registers right after the load and never written out at full precision.

Storage (the contract shared with llmlab.quant):
    packed   uint8 (N, K // 2): the low nibble is column 2j, the high nibble column 2j + 1
    scales, offsets (N, K // group_size), in x's dtype or fp32
    W[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g],   q in 0..15

Two kernels: one token (M = 1) takes a GEMV made of multiply-adds; several (a batch, a prefill)
take a GEMM on the tensor cores, which needs at least 16 rows of x and wastes the padding at M = 1.
"""

import torch
import triton
import triton.language as tl

from ..quant.packing import unpack_int4
from ..quant.quantize import dequantize


@triton.jit
def int4_gemv_kernel(x_ptr, packed_ptr, scales_ptr, offsets_ptr, y_ptr, N, K, stride_pn, stride_sn,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    # One program: BLOCK_N outputs y[n] = sum_k W[n, k] x[k]. Each step covers one quantization
    # group, so one scale and offset per weight row serve the whole (BLOCK_N, GROUP) tile.
    ns = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)) % N   # wrapped, not masked: see matmul.py
    js = tl.arange(0, GROUP // 2)                                    # packed bytes of one group
    ks = tl.arange(0, GROUP)                                         # columns of one group
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_N, GROUP), dtype=tl.float32)               # summed over K only at the end
    for first in range(0, n_groups, UNROLL):
        # UNROLL groups in straight-line code: their loads are all issued before the first one is
        # used, so many bytes are in flight (there is no tl.dot here for Triton to pipeline around).
        for u in tl.static_range(UNROLL):
            # Past the last group everything loads as 0. (The test is broadcast to a tensor: the
            # interpreter refuses a scalar mask.)
            g = first + u
            packed = tl.load(packed_ptr + ns[:, None] * stride_pn + g * (GROUP // 2) + js[None, :],
                             mask=(g + 0 * js[None, :]) < n_groups, other=0)                   # (BLOCK_N, GROUP/2)
            scale = tl.load(scales_ptr + ns * stride_sn + g, mask=(g + 0 * ns) < n_groups, other=0)
            offset = tl.load(offsets_ptr + ns * stride_sn + g, mask=(g + 0 * ns) < n_groups, other=0)
            scale, offset = scale.to(tl.float32)[:, None], offset.to(tl.float32)[:, None]
            w_even = (packed & 0xF).to(tl.float32) * scale + offset                            # W = q * s + o
            w_odd = (packed >> 4).to(tl.float32) * scale + offset
            # Join the two halves side by side, (BLOCK_N, GROUP/2, 2), which row by row reads
            # W[2j], W[2j+1], ...: the weights back in column order once reshaped.
            w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, GROUP))
            x = tl.load(x_ptr + g * GROUP + ks, mask=(g + 0 * ks) < n_groups, other=0.0)
            acc += w * x.to(tl.float32)[None, :]
    out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + out, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=out < N)


@triton.jit
def int4_gemm_kernel(x_ptr, packed_ptr, scales_ptr, offsets_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                     stride_ym, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program: y[BLOCK_M rows, BLOCK_N outputs], one quantization group per step.
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    js = tl.arange(0, GROUP // 2)
    x_mask = ms[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        packed = tl.load(packed_ptr + ns[:, None] * stride_pn + g * (GROUP // 2) + js[None, :])  # (BLOCK_N, GROUP/2)
        scale = tl.load(scales_ptr + ns * stride_sn + g).to(tl.float32)[:, None]              # (BLOCK_N, 1)
        offset = tl.load(offsets_ptr + ns * stride_sn + g).to(tl.float32)[:, None]
        # Rather than interleave the nibbles, each half meets the matching (even or odd) columns of x.
        w_even = ((packed & 0xF).to(tl.float32) * scale + offset).to(x_ptr.dtype.element_ty)
        w_odd = ((packed >> 4).to(tl.float32) * scale + offset).to(x_ptr.dtype.element_ty)
        x_cols = x_ptr + ms[:, None] * stride_xm + g * GROUP + 2 * js[None, :]
        x_even = tl.load(x_cols, mask=x_mask, other=0.0)                                       # (BLOCK_M, GROUP/2)
        x_odd = tl.load(x_cols + 1, mask=x_mask, other=0.0)
        acc = tl.dot(x_even, tl.trans(w_even), acc)
        acc = tl.dot(x_odd, tl.trans(w_odd), acc)
    out_ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + ms[:, None] * stride_ym + out_ns[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=x_mask & (out_ns[None, :] < N))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (M, K) -> y = x @ W.T, (M, N) in x's dtype. M = 1 takes the GEMV, more rows the GEMM."""
    M, K = x.shape
    N = packed.shape[0]
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2)
    assert scales.shape == offsets.shape == (N, K // group_size) and scales.stride() == offsets.stride()
    if K % group_size or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"int4_matmul needs a power-of-two group_size >= 32 dividing K (tl.dot's smallest "
                         f"K step is 16 packed bytes); got K={K}, group_size={group_size}")
    x, packed = x.contiguous(), packed.contiguous()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    args = (x, packed, scales, offsets, y)
    if M == 1:
        # 8 rows x 4 groups a step over 2 warps: the best of those measured on an H100 (N=14336,
        # K=4096, group 128: ~28 us, 1.5x faster than bf16 F.linear). It is bound by instruction
        # issue, not memory: about 8 instructions per weight to unpack, convert, scale and add.
        # CUDA kernels such as Marlin go further by building two fp16 weights per integer
        # instruction (lop3/prmt on packed halves), which Triton cannot express without inline asm.
        int4_gemv_kernel[(triton.cdiv(N, 8),)](*args, N, K, packed.stride(0), scales.stride(0),
                                               GROUP=group_size, BLOCK_N=8, UNROLL=4, num_warps=2)
    else:
        block_m = min(64, max(16, triton.next_power_of_2(M)))
        int4_gemm_kernel[(triton.cdiv(N, 64), triton.cdiv(M, block_m))](
            *args, M, N, K, x.stride(0), packed.stride(0), scales.stride(0), y.stride(0),
            GROUP=group_size, BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=4)
    return y


def int4_matmul_reference(x, packed, scales, offsets, group_size: int) -> torch.Tensor:
    """The same product in fp32: the weights unpacked and dequantized by llmlab.quant, then a matmul.
    (group_size is implied by the shape of scales; it is taken to keep int4_matmul's signature.)"""
    w = dequantize(unpack_int4(packed), scales, offsets)                         # (N, K) fp32
    return (x.float() @ w.T).to(x.dtype)
