"""Int4 weight-only GEMV/GEMM for decode: y = x @ W.T with W stored as 4-bit integers.

Decoding one token multiplies each weight once by one activation, so its time is the time to read
the weights, and 4-bit weights are a quarter of the bytes of bf16 ones. The weights are dequantized
in registers right after the load and never written out at full precision.

Storage (the contract shared with llmlab.quant):
    packed   uint8 (N, K // 2): the low nibble is column 2j, the high nibble column 2j + 1
    scales, offsets (N, K // group_size), in x's dtype or fp32
    W[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g],   q in 0..15

Two kernels: one token (M = 1) takes a GEMV made of FMAs, from its own layout (Int4Weights, made
once at load by prepare_int4); several (a batch, a prefill) take a GEMM on the tensor cores, which
needs at least 16 rows of x and wastes the padding at M = 1.

The GEMM, on the same H200 at 2 / 4 / 8 / 16 rows of x @ 14336 x 4096 (data/benchmarks/h200-int4-kernels.json):
the first version converted each nibble with an integer-to-float conversion and took one group a step
without splitting K: 50 / 53 / 61 / 75 us (0.60-0.40x bf16; at 4096 x 14336 only 64 programs for
132 SMs). This one makes each weight's float as the GEMV does (one lop3), multiplies the
four bytes of each word as four tiles with their own tl.dot instead of interleaving them, and splits K,
merged in the kernel like the GEMV: 33.5 / 34.2 / 36.7 / 44.1 us, 0.89-0.69x bf16 (tinygemm: 19-70 us).

The GEMV, measured on an H200 at 1 x 4096 @ 4096 x 14336, group 128 (data/benchmarks/h200-kernels.json):
the first version, a multiply-add per weight after scaling each weight (w = q s + o) and converting
each nibble, took 28.7 us, 1.08x cuBLAS's bf16 GEMV: it issued ~8 instructions per weight. This one
applies scale and offset once per 8 weights (the algebra in the kernel), makes each weight's float with
one lop3 (nibble_as_float), and splits K so that every SM has programs to run: ~18.5 us, 1.6-1.8x
bf16. A kernel that only loads the same bytes in the same layout takes 9.5 us; Nsight Compute puts
the rest on instruction issue (5.6 instructions per weight, issue slots 58 % busy, occupancy held to
50 % by 64 registers a thread). Reading a quarter of the bytes would allow ~3x.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import arrival_counters
from .fused_matvec import wait_for_previous_kernel
from ..quant.packing import unpack_int4
from ..quant.quantize import dequantize


@triton.jit
def nibble_as_float(bits, MASK: tl.constexpr, ASM: tl.constexpr):
    """The nibble under MASK (bits 15-18 or 19-22) of each 32-bit word as an fp32 number, in one instruction.

    0x43000000 is fp32 128.0, whose mantissa bit 15 is worth 1/2 (bit 23 starts the exponent):
    OR-ing a nibble q into bits 15-18 makes the float 128 + q / 2, into bits 19-22 the float 128 + 8 q,
    with no conversion instruction. (bits & MASK) | 0x43000000 is one PTX lop3, which computes any
    function of three registers.
    """
    if ASM:
        if MASK == 0x00078000:
            out = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00078000, 0x43000000, 0xEA;", "=r,r", [bits],
                                            dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00780000, 0x43000000, 0xEA;", "=r,r", [bits],
                                            dtype=tl.int32, is_pure=True, pack=1)
    else:                                  # the same bits in plain Triton: what the interpreter runs
        out = (bits & MASK) | 0x43000000
    return out.to(tl.float32, bitcast=True)


@triton.jit
def byte_at_bit_15(words, B: tl.constexpr):
    """Each word shifted so that its byte B lies at bits 15-22, where nibble_as_float reads its two nibbles."""
    if B == 0:
        return words << 15
    elif B == 1:
        return words << 7
    elif B == 2:
        return words >> 1
    else:
        return words >> 9


@triton.jit
def int4_gemv_kernel(x_ptr, words_ptr, scales_ptr, offsets_ptr, y_ptr, partial_ptr, arrivals_ptr,
                     N, K, GROUPS_PER_SPLIT, GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ASM: tl.constexpr):
    # One program: BLOCK_N outputs over one K-slice of GROUPS_PER_SPLIT groups (int4_slice_sums);
    # the slices of a block of outputs are added by the last of them to finish (merge_split_k).
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    ns = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N           # wrapped, not masked: see matmul.py
    part = int4_slice_sums(x_ptr, x_ptr, words_ptr, scales_ptr, offsets_ptr, ns, pid_k * GROUPS_PER_SPLIT,
                           GROUPS_PER_SPLIT, N, GROUP, GROUPS_PER_STEP, BLOCK_N, ASM, False, False)
    last, sums = merge_split_k(part, partial_ptr, arrivals_ptr, pid_n, pid_k, ns, N, SPLIT_K)
    if last:
        outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + outs, sums.to(y_ptr.dtype.element_ty), mask=outs < N)


@triton.jit
def int4_slice_sums(x_ptr, norm_ptr, words_ptr, scales_ptr, offsets_ptr, ns, first, GROUPS_PER_SPLIT, N,
                    GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, BLOCK_N: tl.constexpr,
                    ASM: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
    """sum_k W[n, k] x[k] for the outputs ns over the groups first .. first + GROUPS_PER_SPLIT, (BLOCK_N,) fp32;
    with NORM, x[k] * norm[k] in place of x[k]. With PDL, the first weights are loaded before waiting
    for the kernel that writes x (fused_matvec.wait_for_previous_kernel).

    words[j, n] holds W[n, 8j : 8j + 8] (the kernel layout: see prepare_int4). Per group g, with s, o
    its scale and offset,
        sum_k W[n, k] x[k] = s[g, n] * sum_k q[n, k] x[k] + o[g, n] * sum_k x[k]
    so a weight costs one lop3 (nibble_as_float), one FMA and half a shift; scale and offset are
    applied once per word, and nothing is reduced across threads until the end."""
    us = tl.arange(0, GROUPS_PER_STEP)[:, None]                    # (U, 1): the groups of one step
    js = tl.arange(0, GROUP // 8)[None, :]                         # (1, G/8): the words of one group
    total = tl.zeros((GROUPS_PER_STEP, GROUP // 8, BLOCK_N), dtype=tl.float32)
    # Each step's weights are loaded one step ahead, while the step before is being computed: a
    # load waits ~1 us for DRAM, and without the prefetch every step would wait that long.
    words = tl.load(words_ptr + ((first + us) * (GROUP // 8) + js)[:, :, None] * N + ns[None, None, :])
    wait_for_previous_kernel(PDL)
    for g in range(first, first + GROUPS_PER_SPLIT, GROUPS_PER_STEP):
        gs = g + us                                                # (U, 1) group numbers
        word_rows = gs * (GROUP // 8) + js                         # (U, G/8) rows of `words`
        ahead = word_rows + GROUPS_PER_STEP * (GROUP // 8)
        more = (gs + GROUPS_PER_STEP < first + GROUPS_PER_SPLIT) & (js >= 0)                  # (U, G/8); a tensor:
        next_words = tl.load(words_ptr + ahead[:, :, None] * N + ns[None, None, :],            # the interpreter
                             mask=more[:, :, None], other=0)                                    # takes no scalar mask
        scale = tl.load(scales_ptr + gs * N + ns[None, :]).to(tl.float32)                  # (U, BLOCK_N)
        offset = tl.load(offsets_ptr + gs * N + ns[None, :]).to(tl.float32)
        # Byte b of a word holds columns 8j + 2b (low nibble) and 8j + 2b + 1 (high). Shifted to bits
        # 15-22, they read as 128 + q / 2 and 128 + 8 q, so they meet 2 x and x / 8 (exact scalings).
        acc = tl.zeros((GROUPS_PER_STEP, GROUP // 8, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((GROUPS_PER_STEP, GROUP // 8), dtype=tl.float32)      # sum of x over each word
        x_seen = tl.zeros((GROUPS_PER_STEP, GROUP // 8), dtype=tl.float32)     # ... as the FMAs see it
        for b in tl.static_range(4):
            byte = byte_at_bit_15(words, b)
            x_even = tl.load(x_ptr + word_rows * 8 + 2 * b).to(tl.float32)                 # (U, G/8)
            x_odd = tl.load(x_ptr + word_rows * 8 + 2 * b + 1).to(tl.float32)
            if NORM:                                               # the norm's weights; its 1/rms waits
                x_even *= tl.load(norm_ptr + word_rows * 8 + 2 * b).to(tl.float32)         # for the end
                x_odd *= tl.load(norm_ptr + word_rows * 8 + 2 * b + 1).to(tl.float32)
            acc = tl.fma(nibble_as_float(byte, 0x00078000, ASM), (x_even * 2.0)[:, :, None], acc)
            acc = tl.fma(nibble_as_float(byte, 0x00780000, ASM), (x_odd * 0.125)[:, :, None], acc)
            x_sum += x_even + x_odd
            x_seen += x_even * 2.0 + x_odd * 0.125
        # acc - 128 * x_seen = sum_k q x over the word; then scale and offset, one FMA each per word.
        total = tl.fma(acc - 128.0 * x_seen[:, :, None], scale[:, None, :], total)
        total = tl.fma(x_sum[:, :, None], offset[:, None, :], total)
        words = next_words
    return tl.sum(tl.sum(total, axis=1), axis=0)                   # (BLOCK_N,)


@triton.jit
def merge_split_k(part, partial_ptr, arrivals_ptr, counter, pid_k, where, slice_size, SPLIT_K: tl.constexpr):
    """(last, sums): whether this program finishes its block of outputs, and, if it does, the sums over
    all SPLIT_K slices. Each slice leaves its sums `part` in `partial` (slice k at k * slice_size + where,
    any shape of offsets); the last of the block's programs to arrive (counting itself in on arrival
    counter `counter`) adds them in a fixed order, so the result is the same every run: one launch, no
    second reduction kernel."""
    last = pid_k == pid_k                                          # True, as a tensor: see below
    sums = part
    if SPLIT_K > 1:
        tl.store(partial_ptr + pid_k * slice_size + where, part)
        tl.debug_barrier()                                         # every thread's store before the count
        arrived = tl.atomic_add(arrivals_ptr + counter, 1, sem="acq_rel")
        last = arrived == SPLIT_K - 1
        if last:
            sums = tl.zeros_like(part)
            for k in range(SPLIT_K):                               # .cg: from L2, never a stale L1 line
                sums += tl.load(partial_ptr + k * slice_size + where, cache_modifier=".cg")
            tl.atomic_xchg(arrivals_ptr + counter, 0)              # ready for the next call (and graph replay)
    return last, sums


@triton.jit
def int4_gemm_kernel(x_ptr, rows_ptr, scales_ptr, offsets_ptr, y_ptr, partial_ptr, arrivals_ptr, M, N, K,
                     STEPS_PER_SPLIT, stride_xm, stride_sn, stride_ym, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ASM: tl.constexpr):
    # One program: y[BLOCK_M rows, BLOCK_N outputs] over one K-slice, 16 words (128 columns) a step, on
    # the tensor cores. rows[n, j] is packed row n read as 32-bit words, W[n, 8j : 8j + 8]. Each weight
    # becomes a float as in the GEMV (half a shift, one lop3: f = 128 + q / 2 or 128 + 8 q) and then
    # w = q s + o in one FMA, f (2 s) + (o - 256 s) or f (s / 8) + (o - 16 s). The four bytes of a word
    # are four (BLOCK_N, 16) tiles of columns 8j + 2b and 8j + 2b + 1, each multiplied by the matching
    # columns of x in its own tl.dot: the tiles are never interleaved back into column order.
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N            # wrapped, not masked: see matmul.py
    n_words = K // 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(pid_k * STEPS_PER_SPLIT, (pid_k + 1) * STEPS_PER_SPLIT):
        js = step * 16 + tl.arange(0, 16)                         # the step's words; past K only if K % 128
        inside = js < n_words
        words = tl.load(rows_ptr + ns[:, None] * n_words + js[None, :], mask=inside[None, :], other=0)
        if GROUP >= 128:                                           # the step lies in one group
            scale = tl.load(scales_ptr + ns * stride_sn + step * 128 // GROUP).to(tl.float32)[:, None]
            offset = tl.load(offsets_ptr + ns * stride_sn + step * 128 // GROUP).to(tl.float32)[:, None]
        else:                                                      # several: each word's own
            groups = ns[:, None] * stride_sn + (js // (GROUP // 8))[None, :]
            scale = tl.load(scales_ptr + groups, mask=inside[None, :], other=0.0).to(tl.float32)
            offset = tl.load(offsets_ptr + groups, mask=inside[None, :], other=0.0).to(tl.float32)
        low = (2.0 * scale, offset - 256.0 * scale)                # f = 128 + q / 2 -> q s + o
        high = (0.125 * scale, offset - 16.0 * scale)              # f = 128 + 8 q   -> q s + o
        x_cols = x_ptr + ms[:, None] * stride_xm + 8 * js[None, :]
        x_mask = (ms[:, None] < M) & inside[None, :]
        for b in tl.static_range(4):                               # byte b: columns 8j + 2b, 8j + 2b + 1
            byte = byte_at_bit_15(words, b)
            w = tl.fma(nibble_as_float(byte, 0x00078000, ASM), low[0], low[1]).to(x_ptr.dtype.element_ty)
            acc = tl.dot(tl.load(x_cols + 2 * b, mask=x_mask, other=0.0), tl.trans(w), acc)
            w = tl.fma(nibble_as_float(byte, 0x00780000, ASM), high[0], high[1]).to(x_ptr.dtype.element_ty)
            acc = tl.dot(tl.load(x_cols + 2 * b + 1, mask=x_mask, other=0.0), tl.trans(w), acc)
    where = ms[:, None] * N + ns[None, :]                          # in one slice's (rows, N) sums
    last, sums = merge_split_k(acc, partial_ptr, arrivals_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, where,
                               tl.num_programs(1) * BLOCK_M * N, SPLIT_K)
    if last:
        outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + ms[:, None] * stride_ym + outs[None, :], sums.to(y_ptr.dtype.element_ty),
                 mask=(ms[:, None] < M) & (outs[None, :] < N))


def check_group_size(K: int, group_size: int) -> None:
    if K % group_size or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"int4_matmul needs a power-of-two group_size >= 32 dividing K (tl.dot's smallest "
                         f"K step is 16 packed bytes); got K={K}, group_size={group_size}")


class Int4Weights(NamedTuple):
    """An int4 matrix in the GEMV kernel's layout (prepare_int4): for each output n, contiguous over n,
        words   int32 (K/8, N): words[j, n] = W[n, 8j : 8j + 8] as nibbles 0..7 (a little-endian view
                of the packed bytes of the contract above, transposed)
        scales, offsets (K/group, N)
    Contiguous over n, a warp's 32 threads read 32 neighbouring outputs' words in one 128-byte line,
    and each thread reuses the 8 values of x a word needs for all the outputs it holds."""
    words: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int


def prepare_int4(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> Int4Weights:
    """The kernel layout of the (N, K/2)-packed form: done once, at load."""
    N, half_k = packed.shape
    K = 2 * half_k
    assert packed.dtype == torch.uint8 and scales.shape == offsets.shape == (N, K // group_size)
    check_group_size(K, group_size)
    words = packed.contiguous().view(torch.int32).T.contiguous()                  # (K/8, N)
    return Int4Weights(words, scales.T.contiguous(), offsets.T.contiguous(), group_size)


def unprepare_int4(weights: Int4Weights) -> torch.Tensor:
    """The packed (N, K/2) bytes back from the kernel layout."""
    return weights.words.T.contiguous().view(torch.uint8)


def gemv_config(n: int, k: int, group_size: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, GROUPS_PER_STEP, SPLIT_K, num_warps): 64 outputs a program, one group a step, 4 warps,
    and K split until there are 8 programs per SM (at most 16 slices). Of 25 configurations timed on an
    H200 for every decode GEMV of Llama-3-8B and 3.2-1B (data/benchmarks/h200-int4-gemv-sweep.json), this
    rule is within 10 % of the best on 8 of the 9 shapes; at 16384 x 2048 it is 1.23x the best (which
    splits less). A short, wide matrix needs no split; a tall one does."""
    n_groups = k // group_size
    split_k = 1
    while -(-n // 64) * split_k < 8 * sms and split_k < 16 and n_groups % (split_k * 2) == 0:
        split_k *= 2
    return 64, 1, split_k, 4


def gemm_config(n: int, k: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, SPLIT_K, num_warps, num_stages) of the int4 GEMM: 128 outputs a program, 8 warps, 3
    stages, and K split until there are 1.5 programs per SM (at most 16 slices). Of 45 configurations
    timed on an H200 at 2 and 16 rows for every decode shape of Llama-3-8B and 3.2-1B
    (data/benchmarks/h200-int4-gemm-sweep.json), this rule is 1.06x the best on average, 1.25x at worst."""
    steps = -(-k // 128)
    split_k = 1
    while -(-n // 128) * split_k < 1.5 * sms and split_k < 16 and steps % (split_k * 2) == 0:
        split_k *= 2
    return 128, split_k, 8, 3


_sms: dict = {}


def sm_count(device: torch.device) -> int:
    """How many SMs gemv_config spreads the programs over (4 for the interpreter: a few slices to test)."""
    if device.type != "cuda":
        return 4
    if device not in _sms:
        _sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[device]


def int4_gemv(x: torch.Tensor, weights: Int4Weights, asm: bool | None = None, config=None) -> torch.Tensor:
    """x (1, K) -> y = x @ W.T (1, N) in x's dtype, from the kernel layout."""
    M, K = x.shape
    N = weights.words.shape[1]
    assert M == 1 and weights.words.shape[0] * 8 == K
    if asm is None:
        asm = x.device.type == "cuda"                      # the interpreter runs no PTX
    block_n, per_step, split_k, warps = config or gemv_config(N, K, weights.group_size, sm_count(x.device))
    n_groups = K // weights.group_size
    if n_groups % (per_step * split_k):
        raise ValueError(f"int4_gemv: {n_groups} groups do not split into {split_k} slices of {per_step}-group steps")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    # Split-K partial sums (fp32, a fresh buffer: in a CUDA graph, memory of the graph's own pool) and
    # one arrival counter per block of outputs.
    partial = torch.empty(split_k * N, device=x.device, dtype=torch.float32) if split_k > 1 else y
    arrivals = arrival_counters("int4_gemv", x.device, triton.cdiv(N, block_n)) if split_k > 1 else y
    int4_gemv_kernel[(triton.cdiv(N, block_n), split_k)](
        x.contiguous(), weights.words, weights.scales, weights.offsets, y, partial, arrivals, N, K,
        n_groups // split_k, GROUP=weights.group_size, GROUPS_PER_STEP=per_step, BLOCK_N=block_n,
        SPLIT_K=split_k, ASM=asm, num_warps=warps)
    return y


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int, prepared: Int4Weights | None = None, config=None) -> torch.Tensor:
    """x (M, K) -> y = x @ W.T, (M, N) in x's dtype. One token takes the GEMV (from the kernel layout,
    `prepared`, made here if not given), more the GEMM."""
    M, K = x.shape
    N = packed.shape[0]
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2)
    assert scales.shape == offsets.shape == (N, K // group_size) and scales.stride() == offsets.stride()
    check_group_size(K, group_size)
    if M == 1:
        return int4_gemv(x, prepared or prepare_int4(packed, scales, offsets, group_size))
    x, rows = x.contiguous(), packed.contiguous().view(torch.int32)            # (N, K/8) words
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    block_m, steps = (16 if M <= 16 else 64), triton.cdiv(K // 8, 16)
    block_n, split_k, warps, stages = config or gemm_config(N, K, sm_count(x.device))
    if steps % split_k:
        raise ValueError(f"int4_matmul: {steps} steps of 128 columns do not split into {split_k} slices")
    m_blocks, n_blocks = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    partial = torch.empty(split_k * m_blocks * block_m * N, device=x.device, dtype=torch.float32) if split_k > 1 else y
    arrivals = arrival_counters("int4_gemm", x.device, m_blocks * n_blocks) if split_k > 1 else y
    int4_gemm_kernel[(n_blocks, m_blocks, split_k)](
        x, rows, scales, offsets, y, partial, arrivals, M, N, K, steps // split_k, x.stride(0), scales.stride(0),
        y.stride(0), GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k,
        ASM=x.device.type == "cuda", num_warps=warps, num_stages=stages)
    return y


def int4_matmul_reference(x, packed, scales, offsets, group_size: int) -> torch.Tensor:
    """The same product in fp32: the weights unpacked and dequantized by llmlab.quant, then a matmul.
    (group_size is implied by the shape of scales; it is taken to keep int4_matmul's signature.)"""
    w = dequantize(unpack_int4(packed), scales, offsets)                         # (N, K) fp32
    return (x.float() @ w.T).to(x.dtype)
