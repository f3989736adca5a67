"""The key/value cache: every layer's keys and values for the tokens seen so far.

Without it each new token recomputes K and V for the whole sequence (O(n^2) work in total); with it
a decode step computes K and V for one token and reads the rest from here.

Every cache has one method the model calls, `update(layer, start_pos, k, v)`: store the new keys and
values of each sequence at its positions start_pos.., and return the keys and values to attend over.
`start_pos` is either

- a Python int (the eager reference path): the same start for every row; the cache returns positions
  0 .. start_pos+new-1, a slice whose length grows every step, and attention masks by shapes; or
- a (batch,) tensor on the device (the fixed-shape path): each row is written at its own positions
  with an indexed copy, and the cache returns its *whole* buffer, max_seq_len positions, every step.
  Attention then masks out the positions not written yet (model.attention_mask). The shapes never
  change from one step to the next, which is what torch.compile(fullgraph=True) and CUDA graphs need.

Three layouts sit behind it:

KVCache           one contiguous preallocated buffer per sequence (optionally stored in bf16/fp16)
QuantizedKVCache  the same, stored as int8 with one scale per (head, token)
PagedKVCache      fixed-size blocks from a shared BlockPool, found through a block table (eager only:
                  its block table grows on the host)

Each layer has its own buffers, as wide as that layer's key/value heads (`config.kv_heads_of`): the
layers of a structurally pruned model may keep different numbers of heads.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig
from .errors import LlmlabError
from .options import SWITCHES


class KVCache:
    """Contiguous buffers, one (batch, kv_heads, max_seq_len, head_dim) per layer, allocated once
    (kv_heads: that layer's).

    `dtype` is how the cache stores values; reads come back in the dtype of the keys written (the
    model's), so a bf16 cache under an fp32 model halves the memory and rounds each stored value.
    """

    def __init__(self, config: ModelConfig, max_seq_len: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shapes = layer_shapes(config, batch, max_seq_len)
        # One buffer per layer rather than one (layers, ...) tensor: a compiled step writes into its
        # inputs in place, but a write into a slice of one big input makes the compiler copy all of it.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.max_seq_len = max_seq_len

    def update(self, layer: int, start_pos, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (batch, kv_heads, new, head_dim) at start_pos; return the keys and values of
        positions 0 .. start_pos+new-1 (an int start_pos) or of every position (a tensor one). In the
        model's dtype these are views (no copy)."""
        keys, values = self.keys[layer], self.values[layer]
        if isinstance(start_pos, int):
            end = start_pos + k.shape[2]
            keys[:, :, start_pos:end] = k
            values[:, :, start_pos:end] = v
            return keys[:, :, :end].to(k.dtype), values[:, :, :end].to(v.dtype)
        write_at_positions(keys, start_pos, k)
        write_at_positions(values, start_pos, v)
        return keys.to(k.dtype), values.to(v.dtype)

    @property
    def k(self) -> torch.Tensor:
        """Every layer's keys, (layers, batch, kv_heads, max_seq_len, head_dim): a copy, for looking at
        (layers of the same width only: read `keys[layer]` of a pruned model's cache)."""
        return torch.stack(self.keys)

    @property
    def v(self) -> torch.Tensor:
        return torch.stack(self.values)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values)


def layer_shapes(config: ModelConfig, batch: int, max_seq_len: int) -> list[tuple[int, ...]]:
    """Each layer's (batch, kv_heads, max_seq_len, head_dim)."""
    return [(batch, config.kv_heads_of(i), max_seq_len, config.head_dim) for i in range(config.n_layers)]


def write_at_positions(buffer: torch.Tensor, start_pos: torch.Tensor, new: torch.Tensor) -> None:
    """buffer[b, :, start_pos[b] + i] = new[b, :, i] for every row b and new token i, in place.

    buffer (batch, kv_heads, max_seq_len, head_dim); new (batch, kv_heads, n_new, head_dim); start_pos
    (batch,) on the device. One indexed copy whatever the positions: no host sync, no shape change."""
    batch, _, n_new, _ = new.shape
    rows = torch.arange(batch, device=new.device)[:, None]                         # (batch, 1)
    positions = start_pos[:, None] + torch.arange(n_new, device=new.device)        # (batch, n_new)
    # advanced indices on dims 0 and 2 around a slice: the indexed view is (batch, n_new, kv_heads, head_dim)
    buffer[rows, :, positions] = new.transpose(1, 2).to(buffer.dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 over the last dimension: x ≈ scale * q, scale = max|x| / 127, q in [-127, 127]."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
    q = torch.round(x.float() / scale.clamp(min=1e-12)).clamp(-127, 127).to(torch.int8)
    return q, scale


class QuantizedKVCache:
    """int8 keys and values with one fp32 scale per (layer, batch, head, token): a quarter of fp32's
    bytes plus 4 bytes per head_dim values. Each stored vector is off by at most scale / 2 per element."""

    def __init__(self, config: ModelConfig, max_seq_len: int, batch: int = 1,
                 device: str | torch.device = "cpu"):
        shapes = layer_shapes(config, batch, max_seq_len)
        scale_shapes = [shape[:-1] + (1,) for shape in shapes]      # one scale per (head, token)

        def zeros(shapes, dtype):                     # one buffer per layer, as in KVCache
            return [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.keys, self.values = zeros(shapes, torch.int8), zeros(shapes, torch.int8)
        self.key_scales, self.value_scales = zeros(scale_shapes, torch.float32), zeros(scale_shapes, torch.float32)
        self.max_seq_len = max_seq_len

    def update(self, layer: int, start_pos, k: torch.Tensor, v: torch.Tensor):
        (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
        stored = (self.keys[layer], self.key_scales[layer], self.values[layer], self.value_scales[layer])
        if isinstance(start_pos, int):
            end = start_pos + k.shape[2]
            for buffer, new in zip(stored, (qk, sk, qv, sv)):
                buffer[:, :, start_pos:end] = new
        else:
            end = self.max_seq_len
            for buffer, new in zip(stored, (qk, sk, qv, sv)):
                write_at_positions(buffer, start_pos, new)
        keys, key_scales, values, value_scales = (t[:, :, :end] for t in stored)
        return (keys * key_scales).to(k.dtype), (values * value_scales).to(v.dtype)   # dequantize what is read

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values + self.key_scales + self.value_scales)


class BlockPool:
    """Physical KV memory as fixed-size blocks of `block_size` tokens, shared by many sequences.

    `k[layer]` and `v[layer]` are (kv_heads, n_blocks, block_size, head_dim), kv_heads that layer's:
    for one layer and head, a sequence's blocks gathered in block-table order are its keys in
    position order, with a single copy.
    A sequence takes a block only when it fills the previous one, so at most block_size - 1 slots per
    sequence are ever unused, where a contiguous cache reserves max_seq_len slots for every sequence.
    """

    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shapes = [(config.kv_heads_of(i), n_blocks, block_size, config.head_dim) for i in range(config.n_layers)]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.block_size = block_size
        self.free_blocks = list(range(n_blocks - 1, -1, -1))   # a stack: pop() hands out block 0 first

    @property
    def n_blocks(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def block(self, layer: int, index: int) -> torch.Tensor:
        """The keys stored in one physical block: (kv_heads, block_size, head_dim)."""
        return self.k[layer][:, index]

    def allocate(self) -> int:
        if not self.free_blocks:
            raise LlmlabError(
                f"the KV block pool is full: all {self.n_blocks} blocks of {self.block_size} tokens are in use. "
                f"Free finished sequences, or make the pool larger"
            )
        return self.free_blocks.pop()

    def release(self, blocks: list[int]) -> None:
        self.free_blocks.extend(reversed(blocks))


class PagedKVCache:
    """One sequence's cache inside a BlockPool: its block table maps logical block i (tokens
    i*block_size ..) to a physical block of the pool. Appending writes into the last block or takes a
    new one; nothing already stored moves."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_table: list[int] = []
        self.length = 0
        self._step = None   # (start_pos, end, blocks, offsets, table): the same for every layer of a step

    def reserve(self, n_tokens: int) -> None:
        """Make sure blocks exist for positions 0 .. n_tokens-1."""
        while len(self.block_table) * self.pool.block_size < n_tokens:
            self.block_table.append(self.pool.allocate())
        self.length = max(self.length, n_tokens)

    def release(self) -> None:
        self.pool.release(self.block_table)
        self.block_table, self.length, self._step = [], 0, None

    def _indices(self, start_pos: int, end: int, device):
        """Where positions start_pos..end-1 go (physical block, offset in it), and the block table as
        a tensor: computed once per step, not once per layer."""
        if self._step is None or self._step[:2] != (start_pos, end):
            self.reserve(end)
            bs = self.pool.block_size
            table = torch.tensor(self.block_table[: -(-end // bs)], device=device)   # blocks in use
            positions = torch.arange(start_pos, end, device=device)
            self._step = (start_pos, end, table[positions // bs], positions % bs, table)
        return self._step[2:]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        # k, v: (1, kv_heads, new, head_dim) -- one sequence
        if not isinstance(start_pos, int):
            raise LlmlabError("the paged KV cache takes a Python int start_pos (it stays eager); "
                              "use the static cache for the fixed-shape path")
        end = start_pos + k.shape[2]
        blocks, offsets, table = self._indices(start_pos, end, k.device)
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]     # (kv_heads, n_blocks, block_size, head_dim)
        pool_k[:, blocks, offsets] = k[0].to(pool_k.dtype)          # (kv_heads, new, head_dim) into their slots
        pool_v[:, blocks, offsets] = v[0].to(pool_v.dtype)
        # gather this sequence's blocks in table order: (kv_heads, blocks, block_size, head_dim) -> positions
        keys = pool_k.index_select(1, table).view(1, k.shape[1], -1, k.shape[3])[:, :, :end]
        values = pool_v.index_select(1, table).view(1, v.shape[1], -1, v.shape[3])[:, :, :end]
        return keys.to(k.dtype), values.to(v.dtype)


KV_CACHES = SWITCHES["kv_cache"][0]


def make_cache(kind: str, config: ModelConfig, max_seq_len: int, dtype: torch.dtype,
               device: str | torch.device, block_size: int = 16, batch: int = 1):
    """The engine's KV-cache switch, for `batch` sequences of up to max_seq_len tokens (paged: one)."""
    if kind == "static":
        return KVCache(config, max_seq_len, batch, dtype=dtype, device=device)
    if kind in ("kv-bf16", "kv-fp16"):
        return KVCache(config, max_seq_len, batch, dtype={"kv-bf16": torch.bfloat16, "kv-fp16": torch.float16}[kind],
                       device=device)
    if kind == "kv-int8":
        return QuantizedKVCache(config, max_seq_len, batch, device=device)
    if batch != 1:
        raise LlmlabError("a paged cache here holds one sequence; make one per sequence in a shared BlockPool")
    if kind == "paged":
        pool = BlockPool(config, math.ceil(max_seq_len / block_size), block_size, dtype=dtype, device=device)
        return PagedKVCache(pool)
    raise LlmlabError(f"unknown KV cache {kind!r}; choose one of: {', '.join(KV_CACHES)}")
