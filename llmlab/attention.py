"""Attention behind one signature: the maths written out, and PyTorch's fused kernel.

Both take queries for positions start_pos .. start_pos+q_len-1 and keys/values for positions
0 .. kv_len-1 (the cache plus the new tokens), and return the attended values:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

with M the causal mask (0 where key j <= query i, -inf after it). Grouped-query attention: each of
the n_kv_heads key/value heads serves n_heads // n_kv_heads query heads.

`mask` is None on the eager path: keys are exactly the positions seen so far, and the causal mask
follows from the shapes. On the fixed-shape path the keys are the cache's whole buffer, and `mask`
(batch, 1, q_len, kv_len), True where query i may see key j, is built from each sequence's positions
by `model.attention_mask`: the same maths, with the unwritten slots given weight exactly 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import LlmlabError


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(q_len, kv_len) bool, True where query i may see key j. Queries are the last q_len positions."""
    start_pos = kv_len - q_len
    i = torch.arange(q_len, device=device).unsqueeze(1) + start_pos
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return j <= i


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    # q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)   # query head h reads KV head h // group
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])     # (batch, n_heads, q_len, kv_len)
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)      # softmax in fp32: exp overflows in fp16
    return weights @ v                                               # (batch, n_heads, q_len, head_dim)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    q_len, kv_len = q.shape[2], k.shape[2]
    if mask is not None:
        is_causal = False                        # the fixed-shape path: the mask says it all
    elif q_len == 1:
        mask, is_causal = None, False            # one new token may see every cached one
    elif q_len == kv_len:
        mask, is_causal = None, True             # prefill from an empty cache: the plain causal mask
    else:
        mask, is_causal = causal_mask(q_len, kv_len, q.device), False   # a chunk after cached tokens
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """llmlab's own Triton kernels: FlashAttention for a prefill (or a chunk after cached tokens),
    split-K decode attention for one new token. Imported here, at first use, because importing
    llmlab.kernels starts Triton (and, without a GPU, its CPU interpreter)."""
    from .kernels.decode_attention import decode_attention
    from .kernels.flash_attention import flash_attention
    if mask is not None:
        raise LlmlabError("attention='triton' reads a cache of the current length; the fixed-shape path "
                          "(compile, cuda_graphs) needs attention='sdpa' or 'naive'")
    if q.shape[2] == 1:
        return decode_attention(q, k, v)
    return flash_attention(q, k, v)


ATTENTION = {"naive": naive_attention, "sdpa": sdpa_attention, "triton": triton_attention}
