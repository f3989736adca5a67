"""The key/value cache: every layer's keys and values for the tokens seen so far.

Without it each new token recomputes K and V for the whole sequence (O(n^2) work in total); with it
a decode step computes K and V for one token and reads the rest from here. The buffers are
preallocated once at their final size, so no step allocates and every shape is known in advance.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, max_seq_len: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (config.n_layers, batch, config.n_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # (layers, batch, kv_heads, seq, head_dim)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (batch, kv_heads, new, head_dim) at start_pos; return the keys and values of
        positions 0 .. start_pos+new-1 as views into the buffers (no copy)."""
        end = start_pos + k.shape[2]
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
