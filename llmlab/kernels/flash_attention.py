"""FlashAttention forward for prefill: causal, grouped-query, never materialising the scores.

    O = softmax(Q K^T / sqrt(d) + M) V         M: causal mask, 0 where key j <= query i, else -inf

One program owns BLOCK_M queries of one head. It walks the keys BLOCK_N at a time and keeps, per
query row, a running max m, a running sum l and an unnormalised output acc (the online softmax):

    m' = max(m, rowmax(S))     p = exp(S - m')     l' = l * exp(m - m') + rowsum(p)
    acc' = acc * exp(m - m') + p V                  and at the end  O = acc / l

so the (seq x seq) score matrix never exists; each K/V tile is read once per query block. exp is
computed as exp2, with log2(e) folded into the 1/sqrt(d) scale (exp2 is the hardware instruction).

Causality splits the walk in two: key blocks entirely at or before the block's first query need
no mask; only the few blocks crossing the diagonal are masked; blocks after it are never visited.
Queries may be the LAST q_len of kv_len positions (a prefill chunk after a cache): query i sits at
position i + kv_len - q_len.
"""

import math

import torch
import triton
import triton.language as tl

from . import interpreted


@triton.jit
def _load_kv(k_at, v_at, kv_row, start, keys, kv_len, stride_ks, stride_vs, MASKED: tl.constexpr,
             TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The (BLOCK_N, HEAD_DIM) tiles of K and V at keys start + keys: through a TMA descriptor, or
    through the block of pointers k_at, v_at (pointing at key 0), masked past kv_len where asked."""
    if TMA:          # rows past kv_len come back as zeros: the copy engine clips at the descriptor's shape
        k = k_at.load([kv_row, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_at.load([kv_row, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif MASKED:
        k = tl.load(k_at + start * stride_ks, mask=(start + keys)[:, None] < kv_len, other=0.0)
        v = tl.load(v_at + start * stride_vs, mask=(start + keys)[:, None] < kv_len, other=0.0)
    else:
        k, v = tl.load(k_at + start * stride_ks), tl.load(v_at + start * stride_vs)
    return k, v


@triton.jit
def _attend_block(acc, m_i, l_i, q, k, v, keys, q_pos, kv_len, qk_scale, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
    # q (BLOCK_M, D); k, v (BLOCK_N, D), the keys at positions `keys` (BLOCK_N,)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)         # (BLOCK_M, BLOCK_N) fp32, unscaled
    if MASKED:
        visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] < kv_len)
        s = tl.where(visible, s * qk_scale, float("-inf"))         # log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        # max(s) * scale = max(s * scale) (scale > 0), so the scale goes into the exponent's argument:
        # one FMA per score, s * scale - m, where scaling first costs a multiply and a subtract.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    # Never -inf - -inf: the first block visited holds key 0, which every query sees.
    alpha = tl.math.exp2(m_i - m_new)                              # rescales what was summed so far
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def flash_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, n_heads, q_len, kv_len, qk_scale,
                           stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                           stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    # With TMA (Hopper), q/k/v/o_ptr are descriptors over (batch * heads, positions, head_dim) and the
    # strides are unused; otherwise they are pointers to element 0.
    # Heads vary fastest in launch order and query blocks go from last to first: the long blocks
    # (near the end of the sequence, most keys to see) start first and the short ones fill the tail.
    batch, head = tl.program_id(0) // n_heads, tl.program_id(0) % n_heads
    block_m = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_head = head // GROUP                      # grouped-query: GROUP query heads share one K/V head
    kv_row = batch * (n_heads // GROUP) + kv_head
    offset = kv_len - q_len                      # position of query 0

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)               # (BLOCK_M,) query indices
    q_pos = rows + offset
    keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    if TMA:
        q = q_ptr.load([tl.program_id(0), block_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
        k_at, v_at = k_ptr, v_ptr
    else:
        batch = batch.to(tl.int64)               # batch * stride can pass 2^31 elements
        q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                    mask=rows[:, None] < q_len, other=0.0)             # (BLOCK_M, HEAD_DIM), loaded once
        k_at = k_ptr + batch * stride_kb + kv_head * stride_kh + keys[:, None] * stride_ks + dims[None, :]
        v_at = v_ptr + batch * stride_vb + kv_head * stride_vh + keys[:, None] * stride_vs + dims[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    # Keys [0, n_full) are visible to every query of the block (key <= first query's position);
    # they are also all < kv_len, so these blocks need no mask at all.
    first_pos = block_m * BLOCK_M + offset
    n_full = (first_pos + 1) // BLOCK_N * BLOCK_N
    for start in tl.range(0, n_full, BLOCK_N):
        k, v = _load_kv(k_at, v_at, kv_row, start, keys, kv_len, stride_ks, stride_vs, False, TMA, BLOCK_N, HEAD_DIM)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, start + keys, q_pos, kv_len, qk_scale,
                                      MASKED=False, PRECISION=PRECISION)
    # The diagonal: keys up to the block's last query position, masked per (query, key).
    n_end = tl.minimum(first_pos + BLOCK_M, kv_len)
    for start in tl.range(n_full, n_end, BLOCK_N):
        k, v = _load_kv(k_at, v_at, kv_row, start, keys, kv_len, stride_ks, stride_vs, True, TMA, BLOCK_N, HEAD_DIM)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, start + keys, q_pos, kv_len, qk_scale,
                                      MASKED=True, PRECISION=PRECISION)

    o = (acc / l_i[:, None]).to(q.dtype)
    if TMA:                                      # rows past q_len are clipped by the copy engine
        o_ptr.store([tl.program_id(0), block_m * BLOCK_M, 0], o.reshape(1, BLOCK_M, HEAD_DIM))
    else:
        o_ptrs = o_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_os + dims[None, :]
        tl.store(o_ptrs, o, mask=rows[:, None] < q_len)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 inputs would otherwise take the tensor cores' tf32 path (10-bit
    mantissa, ~1e-3 relative error), so ask for full fp32 ("ieee") there; fp16/bf16 are exact inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_readable(t: torch.Tensor) -> bool:
    """Whether t (batch, heads, positions, head_dim) can be read as (batch * heads, positions, head_dim)
    by TMA: batch and heads merge into one stride, and addresses and strides are 16-byte aligned."""
    return ((t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)) and t.data_ptr() % 16 == 0
            and t.stride(1) * t.element_size() % 16 == 0 and t.stride(2) * t.element_size() % 16 == 0)


def tma_possible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q's device has TMA (Hopper and later), the kernel runs compiled, in 16-bit floats, with
    head_dim <= 128 (larger tiles would not fit shared memory), on layouts TMA can read."""
    return (q.is_cuda and not interpreted() and torch.cuda.get_device_capability(q.device)[0] >= 9
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 128
            and all(tma_readable(t) for t in (q, k, v)))


def tma_descriptor(t: torch.Tensor, block_rows: int):
    """A TMA descriptor over t seen as (batch * heads, positions, head_dim), for tiles of block_rows
    positions of one head. Tiles reaching past the positions are zero-filled on load, clipped on store."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, [t.shape[0] * t.shape[1], t.shape[2], t.shape[3]], [t.stride(1), t.stride(2), 1],
                            [1, block_rows, t.shape[3]])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int | None = None,
                    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                    tma: bool | None = None):
    """Causal attention. q (batch, n_heads, q_len, head_dim); k, v (batch, n_kv_heads, kv_len, head_dim).

    Returns (batch, n_heads, q_len, head_dim) in q's dtype. The queries are the last q_len positions.
    tma: load and store the tiles through TMA descriptors (None: wherever the GPU and the layout allow;
    False: the pointer path, the one the interpreter runs). The block sizes default to ones measured
    good on an H100 (pointers) and an H200 (TMA); the interpreter tests pass small ones.
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim or n_heads % n_kv_heads:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) > kv_len ({kv_len}): the queries must be the last positions of the keys")
    if head_dim not in (16, 32, 64, 128, 256) or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("head_dim must be a power of two in 16..256, with the last dimension contiguous")
    use_tma = tma_possible(q, k, v) if tma is None else tma
    if tma and not tma_possible(q, k, v):
        raise ValueError("tma=True needs a Hopper (or later) GPU, fp16/bf16, head_dim <= 128, and q, k, v whose "
                         "batch and heads merge into one stride, 16-byte aligned: pass tma=None")
    # (BLOCK_M, BLOCK_N, warps, stages) by head_dim, measured on an H100 (bf16, causal, 32 heads):
    # at d=128, 128 queries share each K/V tile over 8 warps (16 rows of S each); BLOCK_N=128 was
    # slower (the 128x128 fp32 score tile crowds the registers). At d=64, 64x64 over 4 warps won.
    # Through TMA on an H200, 128x128 tiles were the fastest at d=128 (the loads no longer take the
    # warps' registers and instructions): 1.07-1.10x 128x64 at 4k-16k tokens.
    default = (128, 64, 8, 3) if head_dim >= 128 else (64, 64, 4, 3)
    if use_tma and head_dim == 128:
        default = (128, 128, 8, 3)
    block_m, block_n = block_m or default[0], block_n or default[1]
    num_warps, num_stages = num_warps or default[2], num_stages or default[3]

    o = q.new_empty(q.shape)                     # contiguous, whatever q's strides: TMA can write it
    tensors = q, k, v, o
    if use_tma:
        tensors = [tma_descriptor(t, rows) for t, rows in zip(tensors, (block_m, block_n, block_n, block_m))]
    grid = (batch * n_heads, triton.cdiv(q_len, block_m))
    flash_attention_kernel[grid](
        *tensors, n_heads, q_len, kv_len, 1.0 / math.sqrt(head_dim) * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), TMA=use_tma, num_warps=num_warps, num_stages=num_stages)
    return o


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same maths in fp32 with the scores materialised: repeat K/V per query head, mask, softmax."""
    group = q.shape[1] // k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])         # (batch, heads, q_len, kv_len)
    q_pos = torch.arange(q_len, device=q.device)[:, None] + kv_len - q_len
    scores = scores.masked_fill(torch.arange(kv_len, device=q.device)[None, :] > q_pos, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)
