"""Decode attention: ONE new query per head against a KV cache of length L (split-K, "flash decoding").

    o = softmax(q K^T / sqrt(d)) V          q (d,), K, V (L, d): no mask, every cached key is visible

With one query there is nothing to tile along the queries, and a program per head would leave most
of the GPU idle while it walks L keys alone. So the keys are cut into n_splits chunks, in one launch:

  1. one program per (batch, KV head, split) attends to its chunk and writes a partial output o_s
     (normalised by its own sum) and its log-sum-exp lse_s = m_s + log(l_s);
  2. the last of a KV head's programs to finish (an atomic counter) combines the splits of its query
     heads: o = sum_s w_s o_s, with w_s = exp(lse_s - max lse) / sum_s' exp(lse_s' - max lse), i.e.
     each split weighted by its share of the total softmax denominator. It loads every split's result
     in one vector load. Merged one split at a time, the one launch was slower than a second merge
     kernel (on an H200, 0.28 against 0.36 of copy bandwidth at 4k keys); in one load it is faster
     (0.41 against 0.37 in the same run).

Grouped-query: the GROUP query heads that share a KV head are processed by the same program, as
the rows of one small matrix, so each byte of the cache is read once. Decode is memory-bound: the
time is the time to read K and V once.
"""

import math

import torch
import triton
import triton.language as tl

from . import arrival_counters, dependent_launch
from .flash_attention import dot_precision
from .fused_matvec import wait_for_previous_kernel


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, part_o_ptr, part_lse_ptr, o_ptr, arrivals_ptr,
                            n_kv_heads, kv_len, split_len, qk_scale, stride_qb, stride_qh, stride_kb, stride_kh,
                            stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_P2: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
                            AT_POSITIONS: tl.constexpr, PDL: tl.constexpr):
    batch, kv_head = tl.program_id(0) // n_kv_heads, tl.program_id(0) % n_kv_heads
    wait_for_previous_kernel(PDL)          # q and the newest k, v come from the kernel before
    if AT_POSITIONS:      # a whole fixed-size cache: row b has written positions 0 .. pos[b]
        kv_len = tl.minimum(tl.load(pos_ptr + batch) + 1, kv_len)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    # The GROUP query heads of this KV head, padded to GROUP_PAD >= 16 rows (tl.dot's minimum):
    # padding rows are zeros and are never stored.
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows                                            # (GROUP_PAD,)
    dims = tl.arange(0, HEAD_DIM)
    batch = batch.to(tl.int64)
    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=rows[:, None] < GROUP, other=0.0)                        # (GROUP_PAD, HEAD_DIM)
    keys = tl.arange(0, BLOCK_N)
    k_ptrs = k_ptr + batch * stride_kb + kv_head * stride_kh + keys[:, None] * stride_ks + dims[None, :]
    v_ptrs = v_ptr + batch * stride_vb + kv_head * stride_vh + keys[:, None] * stride_vs + dims[None, :]

    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    split_start = split * split_len
    # Every split is non-empty for a cache of the current length; at positions, splits past pos[b] are
    # empty: they keep l_i = 0 and store o = 0, lse = -inf, which the reduction weighs by exp2(-inf) = 0.
    split_end = tl.minimum(split_start + split_len, kv_len)
    for start in tl.range(split_start, split_end, BLOCK_N):
        valid = start + keys < split_end                                      # (BLOCK_N,)
        k = tl.load(k_ptrs + start * stride_ks, mask=valid[:, None], other=0.0)   # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_ptrs + start * stride_vs, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale      # (GROUP_PAD, BLOCK_N), log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))                            # online softmax, as in
        alpha = tl.math.exp2(m_i - m_new)                                     # flash_attention.py
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # Partials laid out (batch, n_heads, n_splits, HEAD_DIM) and (batch, n_heads, n_splits), fp32.
    part = (batch * n_kv_heads * GROUP + heads) * n_splits + split           # (GROUP_PAD,)
    tl.store(part_o_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc / tl.maximum(l_i, 1e-30)[:, None],
             mask=rows[:, None] < GROUP)
    tl.store(part_lse_ptr + part, m_i + tl.math.log2(l_i), mask=rows < GROUP)
    # The last of this KV head's splits to arrive merges them all. Every thread's stores come before
    # the count (the barrier), and the count's acquire-release order makes them visible to the last.
    tl.debug_barrier()
    counter = tl.program_id(0)                                                # batch * n_kv_heads + kv_head
    if tl.atomic_add(arrivals_ptr + counter, 1, sem="acq_rel") == n_splits - 1:
        merge_splits(part_o_ptr, part_lse_ptr, o_ptr, batch, kv_head, n_kv_heads, n_splits, stride_ob, stride_oh,
                     GROUP, GROUP_P2, HEAD_DIM, BLOCK_S)
        tl.atomic_xchg(arrivals_ptr + counter, 0)                            # ready for the next call (and replay)


@triton.jit
def merge_splits(part_o_ptr, part_lse_ptr, o_ptr, batch, kv_head, n_kv_heads, n_splits, stride_ob, stride_oh,
                 GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """o of the GROUP query heads of one KV head from their splits' (o_s, lse_s): every split of every
    head in ONE load of (heads, splits, HEAD_DIM), so that the loads wait for memory once, not once a split."""
    heads = kv_head * GROUP + tl.arange(0, GROUP_P2)                          # (H,), GROUP_P2 >= GROUP
    splits = tl.arange(0, BLOCK_S)                                            # BLOCK_S >= n_splits
    dims = tl.arange(0, HEAD_DIM)
    part = (batch * n_kv_heads * GROUP + heads)[:, None] * n_splits + splits[None, :]      # (H, S)
    real = (heads < (kv_head + 1) * GROUP)[:, None]                          # not a padding row
    present = real & (splits < n_splits)[None, :]
    # .cg: from L2, where the other programs' stores are, never a stale L1 line. A missing split (or
    # one past pos[b]) has lse = -inf: weight exp2(-inf) = 0. Padding rows get 0s: never -inf - -inf.
    lse = tl.where(real, tl.load(part_lse_ptr + part, mask=present, other=float("-inf"), cache_modifier=".cg"), 0.0)
    weight = tl.math.exp2(lse - tl.max(lse, axis=1)[:, None])                # (H, S), log2 units
    parts = tl.load(part_o_ptr + part[:, :, None] * HEAD_DIM + dims[None, None, :], mask=present[:, :, None],
                    other=0.0, cache_modifier=".cg")                          # (H, S, HEAD_DIM)
    o = tl.sum(weight[:, :, None] * parts, axis=1) / tl.sum(weight, axis=1)[:, None]
    tl.store(o_ptr + batch * stride_ob + heads[:, None] * stride_oh + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=real)


def default_splits(q: torch.Tensor, batch: int, n_kv_heads: int) -> int:
    """About one program per SM: each streams its chunk with num_stages loads in flight, and fewer,
    longer splits leave less to reduce (on an H100, 16 splits of a 4k cache beat 64)."""
    n_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    return min(64, triton.cdiv(n_sms, batch * n_kv_heads))


def default_block_n(keys_per_split: int) -> int:
    """Keys per step: 64, or 128 once a split holds more than 256 keys. Measured on an H200 (batch 1,
    8 KV heads, 17 splits): 128 reads 0.86 of copy bandwidth at 32k keys where 64 reads 0.75, but
    with 256 keys per split (4k) a step of 128 leaves two steps, too few to hide the first loads."""
    return 128 if keys_per_split > 256 else 64


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_splits: int | None = None,
                     block_n: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """q (batch, n_heads, 1, head_dim); k, v (batch, n_kv_heads, L, head_dim), any strides with the
    last dimension contiguous (e.g. cache[:, :, :L], a view of a preallocated cache).

    Returns (batch, n_heads, 1, head_dim) in q's dtype.
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_len != 1 or k.shape != v.shape or n_heads % n_kv_heads or k.shape[3] != head_dim:
        raise ValueError(f"decode_attention takes one query per head: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if head_dim & (head_dim - 1) or min(q.stride(3), k.stride(3), v.stride(3)) != 1 or kv_len == 0:
        raise ValueError("head_dim must be a power of two, the last dimension contiguous, and L >= 1")
    n_splits = n_splits or default_splits(q, batch, n_kv_heads)
    # Whole BLOCK_N blocks per split, and no empty split (its lse would be -inf - -inf).
    keys_per_split = triton.cdiv(kv_len, min(n_splits, kv_len))
    block_n = block_n or default_block_n(keys_per_split)
    split_len = triton.cdiv(keys_per_split, block_n) * block_n
    return _attend(q, k, v, None, split_len, block_n, num_warps, num_stages)


def decode_attention_at_positions(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                                  block_n: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """The fixed-shape form: q (batch, n_heads, head_dim) of the token at pos (batch,), a tensor; k_cache,
    v_cache (batch, n_kv_heads, max_seq_len, head_dim), row b written at 0 .. pos[b]. The split length
    follows from max_seq_len alone, so the launch is the same at every step (a CUDA graph replays it);
    splits past pos[b] find nothing and weigh nothing."""
    batch, n_kv_heads, max_seq_len, _ = k_cache.shape
    keys_per_split = triton.cdiv(max_seq_len, default_splits(q, batch, n_kv_heads))
    block_n = block_n or default_block_n(keys_per_split)
    split_len = triton.cdiv(keys_per_split, block_n) * block_n
    return _attend(q, k_cache, v_cache, pos, split_len, block_n, num_warps, num_stages)


def _attend(q, k, v, pos, split_len, block_n, num_warps, num_stages):
    # Dependent launch (Hopper): the kernel starts while the one before finishes, and waits for it
    # (gdc_wait) before reading anything.
    pdl = dependent_launch(q.device)
    batch, n_heads, head_dim = q.shape[0], q.shape[1], q.shape[-1]
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_splits = triton.cdiv(kv_len, split_len)
    part_o = torch.empty((batch, n_heads, n_splits, head_dim), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((batch, n_heads, n_splits), device=q.device, dtype=torch.float32)
    o = torch.empty_like(q)
    arrivals = arrival_counters("decode_attention", q.device, batch * n_kv_heads)
    decode_attention_kernel[(batch * n_kv_heads, n_splits)](
        q, k, v, part_lse if pos is None else pos, part_o, part_lse, o, arrivals, n_kv_heads, kv_len, split_len,
        1.0 / math.sqrt(head_dim) * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), GROUP=n_heads // n_kv_heads,
        GROUP_PAD=max(16, triton.next_power_of_2(n_heads // n_kv_heads)),
        GROUP_P2=triton.next_power_of_2(n_heads // n_kv_heads), HEAD_DIM=head_dim, BLOCK_N=block_n,
        BLOCK_S=triton.next_power_of_2(n_splits), PRECISION=dot_precision(q.dtype), AT_POSITIONS=pos is not None,
        PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl)
    return o


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(d)) V in fp32, K/V repeated for each query head of their group."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)                             # (batch, n_heads, L, d)
    v = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])         # (batch, n_heads, 1, L)
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)
