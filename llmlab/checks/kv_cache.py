"""Checks for the exercises of notebooks/06_kv_caching.ipynb.

Expected answers come from caches llmlab really allocates (on PyTorch's meta device, which records
shapes and bytes without memory) and from `KVCache.update` itself, never from a stored number.
"""

from __future__ import annotations

import torch

from llmlab.config import ModelConfig
from llmlab.kv_cache import KVCache

from . import unanswered


def llama3_70b_config() -> ModelConfig:
    """Llama-3-70B's shape: 80 layers, 64 query heads, 8 KV heads of 128 dimensions."""
    return ModelConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       ffn_dim=28672, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False)


def check_70b_kv_bytes(answer, seq_len: int = 8192, batch: int = 1) -> None:
    """`answer`: bytes of Llama-3-70B's bf16 KV cache for `batch` sequences of `seq_len` tokens."""
    if unanswered(answer, "kv_bytes_70b"):
        return
    config = llama3_70b_config()
    expected = KVCache(config, seq_len, batch, dtype=torch.bfloat16, device="meta").nbytes
    assert answer != expected // 2, "that is the keys only (or the values only): the cache stores both"
    assert answer != expected * 2, "bf16 is 2 bytes per value, not 4"
    assert answer != expected * config.n_heads // config.n_kv_heads, (
        "that counts all 64 query heads: with grouped-query attention only the 8 KV heads are cached")
    assert answer == expected, (
        f"{answer:,} is not right: 2 (K and V) × layers × KV heads × head_dim × tokens × batch × 2 bytes")
    print(f"Correct: {expected / 2**30:.2f} GiB per {seq_len:,}-token sequence, "
          f"{expected // seq_len // 1024} KiB per token.")


def check_append(append_kv) -> None:
    """`append_kv(k_buf, v_buf, start_pos, k, v)`: write k, v (batch, kv_heads, new, head_dim) into
    the preallocated buffers (batch, kv_heads, max_len, head_dim) at start_pos, return the keys and
    values of positions 0 .. start_pos+new-1 -- the same contract as one layer of KVCache.update."""
    config = ModelConfig(n_layers=1)
    batch, heads, max_len, head_dim = 2, config.n_kv_heads, 12, config.head_dim
    k_buf = torch.zeros(batch, heads, max_len, head_dim)
    v_buf = torch.zeros_like(k_buf)
    if unanswered(append_kv(k_buf, v_buf, 0, k_buf[:, :, :1].clone(), v_buf[:, :, :1].clone()), "append_kv"):
        return
    k_buf.zero_(), v_buf.zero_()
    reference = KVCache(config, max_len, batch)
    gen = torch.Generator().manual_seed(6)
    start = 0
    for new in (5, 1, 1, 3):                       # a prefill of 5 tokens, two decode steps, a chunk of 3
        k = torch.randn(batch, heads, new, head_dim, generator=gen)
        v = torch.randn(batch, heads, new, head_dim, generator=gen)
        got_k, got_v = append_kv(k_buf, v_buf, start, k, v)
        want_k, want_v = reference.update(0, start, k, v)
        step = f"after appending {new} token(s) at position {start}"
        assert got_k.shape == want_k.shape, (
            f"{step}: expected keys of shape {tuple(want_k.shape)} (every position so far), got {tuple(got_k.shape)}")
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), (
            f"{step}: the returned keys/values differ from KVCache.update: write at positions "
            f"start_pos .. start_pos+new-1 of dimension 2 and return positions 0 .. start_pos+new-1")
        assert torch.equal(k_buf, reference.k[0]) and torch.equal(v_buf, reference.v[0]), (
            f"{step}: the buffers hold something else than KVCache's: write into k_buf and v_buf in place "
            f"(k_buf[:, :, a:b] = k), do not build new tensors")
        assert got_k.data_ptr() == k_buf.data_ptr(), (
            f"{step}: the returned keys are a copy: return a slice of the buffer (a view, no copy)")
        start += new
    print("Correct: the same keys and values as KVCache.update after 4 appends, written in place, returned as views.")
