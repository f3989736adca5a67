"""Paged decode attention: ONE new query per sequence, its keys and values read through its block table.

    o = softmax(q K^T / sqrt(d)) V          K, V: the sequence's positions 0 .. L-1, wherever they lie

A BlockPool layer stores keys as (kv_heads, n_blocks, block_size, head_dim), and position p of a
sequence lives in physical block table[p // block_size], slot p % block_size. One program per
(sequence, KV head) walks the positions BLOCK_N at a time, looks up each position's block in the
table, loads K and V from there, and keeps the online softmax of flash_attention.py (running max m,
running sum l, unnormalised output acc). The blocks are never copied into one contiguous buffer:
that gather is what the PyTorch path (llmlab.serve.batch) pays and this kernel saves.

Grouped-query: the GROUP query heads sharing a KV head are the rows of one small matrix, as in
decode_attention.py, so each byte of the cache is read once per sequence. There is no split-K: a step
of many decoding sequences already gives the GPU batch * kv_heads programs; a few very long
sequences would leave it idle, and decode_attention.py's splits are the way to fix that.
"""

import math

import torch
import triton
import triton.language as tl

from .decode_attention import decode_attention_reference
from .flash_attention import dot_precision


@triton.jit
def paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, o_ptr, n_kv_heads, block_size, qk_scale,
                        stride_qb, stride_qh, stride_kh, stride_kblock, stride_ks, stride_vh, stride_vblock,
                        stride_vs, stride_tb, stride_ob, stride_oh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    seq, kv_head = tl.program_id(0) // n_kv_heads, tl.program_id(0) % n_kv_heads
    kv_len = tl.load(lens_ptr + seq)                   # this sequence's positions, the new one included
    seq = seq.to(tl.int64)
    # The GROUP query heads of this KV head, padded to GROUP_PAD >= 16 rows (tl.dot's minimum):
    # padding rows are zeros and are never stored.
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows                                            # (GROUP_PAD,)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=rows[:, None] < GROUP, other=0.0)                        # (GROUP_PAD, HEAD_DIM)

    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for start in tl.range(0, kv_len, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)                             # (BLOCK_N,)
        valid = positions < kv_len
        # the block table turns each logical position into (physical block, slot in it)
        block = tl.load(table_ptr + seq * stride_tb + positions // block_size, mask=valid, other=0).to(tl.int64)
        slot = positions % block_size
        k = tl.load(k_ptr + kv_head * stride_kh + block[:, None] * stride_kblock + slot[:, None] * stride_ks
                    + dims[None, :], mask=valid[:, None], other=0.0)          # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_ptr + kv_head * stride_vh + block[:, None] * stride_vblock + slot[:, None] * stride_vs
                    + dims[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale   # log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        # online softmax, as in flash_attention.py. Never -inf - -inf: position 0 is in the first tile.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=rows[:, None] < GROUP)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """q (batch, n_heads, head_dim): each sequence's one new query. k_pool, v_pool (n_kv_heads, n_blocks,
    block_size, head_dim): one layer of a BlockPool, the new keys already written. block_tables
    (batch, max_blocks) integer block ids, row b's first ceil(context_lens[b] / block_size) used (the
    rest is padding); context_lens (batch,) >= 1, the positions each query attends to.

    Returns (batch, n_heads, head_dim) in q's dtype.
    """
    batch, n_heads, head_dim = q.shape
    n_kv_heads, _, block_size, _ = k_pool.shape
    if n_heads % n_kv_heads or k_pool.shape != v_pool.shape or k_pool.shape[3] != head_dim:
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)}")
    if head_dim & (head_dim - 1) or min(q.stride(2), k_pool.stride(3), v_pool.stride(3)) != 1:
        raise ValueError("head_dim must be a power of two, and the last dimension contiguous")
    o = torch.empty_like(q)
    paged_decode_kernel[(batch * n_kv_heads,)](
        q, k_pool, v_pool, block_tables, context_lens, o, n_kv_heads, block_size,
        1.0 / math.sqrt(head_dim) * math.log2(math.e),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), block_tables.stride(0), o.stride(0), o.stride(1),
        GROUP=n_heads // n_kv_heads, GROUP_PAD=max(16, triton.next_power_of_2(n_heads // n_kv_heads)),
        HEAD_DIM=head_dim, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), num_warps=num_warps)
    return o


def paged_decode_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """One sequence at a time: gather its blocks in table order, keep its first L positions, and
    attend with decode_attention's reference."""
    block_size, out = k_pool.shape[2], []
    for b, kv_len in enumerate(context_lens.tolist()):
        blocks = block_tables[b, :-(-kv_len // block_size)]
        k, v = (pool[:, blocks].flatten(1, 2)[None, :, :kv_len] for pool in (k_pool, v_pool))   # (1, kv_heads, L, d)
        out.append(decode_attention_reference(q[b, None, :, None], k.to(q.dtype), v.to(q.dtype))[:, :, 0])
    return torch.cat(out)
