"""One forward pass over several sequences of different lengths, each reading and writing its own
blocks of a shared paged KV cache: the engine's half of continuous batching.

A step of a continuous-batching server mixes sequences in different states: some decode (one new
token each), some prefill a chunk of their prompt, perhaps after tokens whose keys and values are
already in their blocks (an earlier chunk, or a prefix the prefix cache shares). Padding them to one
(batch, longest) tensor would spend the matmuls on padding: a 256-token chunk beside 15 one-token
decodes is 16 x 256 rows for 271 real ones. So, as vLLM does, the step's new tokens are flattened into
ONE row of T tokens, each with its own position and the index of its sequence:

    sequence   0  0  0  0  1   2   3            a chunk of 4 prompt tokens, then three decodes
    position   8  9 10 11 40   7 123

The projections, the MLP and the head run over this (1, T, dim) row exactly as over one sequence.
Only three things need to know about sequences, and PagedBatch, handed to the model as its cache
(llmlab.model's flattened form), holds them:

- RoPE rotates each token by its own position (start_pos is the (1, T) tensor of positions);
- `update` writes each token's k, v into slot position % block_size of block table[position // block_size];
- `attend` lets each token see its own sequence's keys at positions up to its own, and nothing else.
  The PyTorch path gathers each sequence's blocks into (batch, kv_heads, longest context, head_dim),
  scatters the queries into (batch, heads, longest chunk, head_dim), attends under one mask (causal
  within a sequence, padding hidden) and picks the outputs back out: no loop over sequences. It does
  so twice, once for the step's decodes and once for its prompt chunks (AttentionGroup): padded to one
  256-token chunk, fifteen one-token decodes would each attend 256 query rows, 255 of them padding. A
  step of decodes only can read the blocks where they lie instead (llmlab.kernels.paged_attention).

With last_only the head runs on each sequence's last new token only: the logits a scheduler samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import validate
from ..attention import naive_attention, sdpa_attention
from ..config import ModelConfig
from ..errors import LlmlabError
from ..kv_cache import BlockPool
from ..model import Transformer, attention_mask, triton_kernel


@dataclass(frozen=True)
class SequenceChunk:
    """What one sequence runs in a step: new `tokens` at positions start_pos, start_pos + 1, ..., whose
    keys and values go into the blocks of `block_table` (physical block ids of the pool, in position
    order). start_pos counts the tokens whose keys and values are already there."""
    block_table: list[int]
    start_pos: int
    tokens: list[int]


class PagedBatch:
    """One step's sequences as the model sees them: the flattened row (`tokens`, `positions`), and the
    cache that writes and attends it. Every index is worked out here once per step, not once per layer.

    Which attention runs follows the model's attention switch (Transformer.set_attention): the PyTorch
    path, except for a step of decodes only under "triton", or under "sdpa" on a GPU, where the paged
    decode kernel reads the blocks in place. "naive" always takes the written-out maths.
    """

    def __init__(self, config: ModelConfig, pool: BlockPool, chunks: list[SequenceChunk], device):
        check_chunks(config, pool, chunks)
        self.pool, bs = pool, pool.block_size
        tokens, positions, write_blocks, last = [], [], [], []
        for chunk in chunks:
            new = range(chunk.start_pos, chunk.start_pos + len(chunk.tokens))
            tokens += list(chunk.tokens)
            positions += new
            write_blocks += [chunk.block_table[p // bs] for p in new]
            last.append(len(tokens) - 1)
        slots = list(zip(write_blocks, (p % bs for p in positions)))
        if len(set(slots)) < len(slots):
            raise LlmlabError("two sequences of the step write their keys into the same slot of the same block: "
                              "a block shared through the prefix cache must be full and only read; give each "
                              "sequence its own block for its new tokens")

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)
        self.tokens, self.positions = tensor([tokens]), tensor([positions])                   # (1, T)
        self.write_blocks, self.write_offsets = tensor(write_blocks), self.positions[0] % bs  # (T,)
        self.last_tokens = tensor(last)                                                     # (batch,)
        self.context_lens = tensor([c.start_pos + len(c.tokens) for c in chunks])
        self.block_tables = padded_tables(chunks, tensor)
        self.all_decodes = all(len(c.tokens) == 1 for c in chunks)
        first = [end - len(c.tokens) + 1 for end, c in zip(last, chunks)]     # each chunk's first row in T
        decodes = [b for b, c in enumerate(chunks) if len(c.tokens) == 1]
        prompts = [b for b, c in enumerate(chunks) if len(c.tokens) > 1]
        self.groups = [AttentionGroup(chunks, members, first, tensor) for members in (decodes, prompts) if members]

    def update(self, layer: int, start_pos, k: torch.Tensor, v: torch.Tensor):
        """Write the T new keys and values, k and v (1, kv_heads, T, head_dim), into their slots; return the
        layer's pools (kv_heads, n_blocks, block_size, head_dim), which `attend` reads through the block
        tables. start_pos (the positions) is not needed: each token's slot was found once for the step."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        pool_k[:, self.write_blocks, self.write_offsets] = k[0].to(pool_k.dtype)     # (kv_heads, T, head_dim)
        pool_v[:, self.write_blocks, self.write_offsets] = v[0].to(pool_v.dtype)
        return pool_k, pool_v

    def attend(self, q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, backend: str) -> torch.Tensor:
        """q (1, heads, T, head_dim) -> (1, heads, T, head_dim): each token attends to its own sequence.
        The heads are the layer's own (a pruned layer may have fewer): they come with q and the pools."""
        if self.all_decodes and (backend == "triton" or backend == "sdpa" and q.is_cuda):
            out = triton_kernel("paged_attention").paged_decode_attention(
                q[0].transpose(0, 1), pool_k, pool_v, self.block_tables, self.context_lens)   # (batch = T, heads, d)
            return out.transpose(0, 1)[None]
        attention = naive_attention if backend == "naive" else sdpa_attention   # Triton's flash kernel takes no mask
        out = torch.empty_like(q)
        for group in self.groups:
            out[0, :, group.rows] = group.attend(q, pool_k, pool_v, attention)
        return out


def padded_tables(chunks: list[SequenceChunk], tensor) -> torch.Tensor:
    """The chunks' block tables as one (len(chunks), longest table) tensor, padded with block 0: padding
    blocks are gathered but hidden by the mask, never read by the kernel."""
    longest = max(len(c.block_table) for c in chunks)
    return tensor([list(c.block_table) + [0] * (longest - len(c.block_table)) for c in chunks])


class AttentionGroup:
    """Some of a step's sequences (`members`, indices into chunks), attended together by the PyTorch
    path: their blocks gathered into (sequences, kv_heads, longest context, head_dim) and their queries
    padded to the group's longest chunk. `first`: each chunk's first row in the step's flattened T."""

    def __init__(self, chunks: list[SequenceChunk], members: list[int], first: list[int], tensor):
        rows, sequence, offset = [], [], []
        for g, b in enumerate(members):
            n = len(chunks[b].tokens)
            rows += range(first[b], first[b] + n)
            sequence += [g] * n
            offset += range(n)                      # where the token's query sits in its sequence's chunk
        self.rows, self.sequence, self.offset = tensor(rows), tensor(sequence), tensor(offset)
        group = [chunks[b] for b in members]
        self.longest_context = max(c.start_pos + len(c.tokens) for c in group)
        self.block_tables = padded_tables(group, tensor)
        # (sequences, 1, longest chunk, longest context): query i of sequence g, at position start_g + i,
        # sees the keys at positions up to its own. That one rule also hides every slot past the
        # sequence's context (stale data, or padding blocks), which lies after all its real queries.
        # Padding queries (i past the chunk) see the whole context, so no row is empty (its softmax
        # would be NaN), and their outputs are never picked.
        longest_chunk = max(len(c.tokens) for c in group)
        query_positions = tensor([c.start_pos for c in group])[:, None] + tensor(range(longest_chunk))
        self.mask = attention_mask(query_positions, tensor(range(self.longest_context))[None])

    def attend(self, q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, attention) -> torch.Tensor:
        """q (1, heads, T, head_dim) of the whole step -> (heads, the group's tokens, head_dim)."""
        keys, values = self.gather(pool_k).to(q.dtype), self.gather(pool_v).to(q.dtype)
        heads, head_dim = q.shape[1], q.shape[3]
        queries = q.new_zeros(len(self.block_tables), heads, self.mask.shape[2], head_dim)
        queries[self.sequence, :, self.offset] = q[0, :, self.rows].transpose(0, 1)   # token -> its row, offset
        out = attention(queries, keys, values, self.mask)      # (sequences, heads, longest chunk, head_dim)
        return out[self.sequence, :, self.offset].transpose(0, 1)

    def gather(self, pool: torch.Tensor) -> torch.Tensor:
        """A pool (kv_heads, n_blocks, block_size, head_dim) -> every member's positions in order,
        (sequences, kv_heads, longest context, head_dim): one copy through the padded block tables."""
        kv_heads, head_dim = pool.shape[0], pool.shape[3]
        blocks = pool[:, self.block_tables]                # (kv_heads, sequences, blocks, block_size, head_dim)
        by_sequence = blocks.transpose(0, 1).reshape(len(self.block_tables), kv_heads, -1, head_dim)
        return by_sequence[:, :, :self.longest_context]


@torch.inference_mode()
def forward_batch(model: Transformer, pool: BlockPool, chunks: list[SequenceChunk]) -> torch.Tensor:
    """Run the model once over every chunk, writing each new token's keys and values into its sequence's
    blocks of `pool`. Returns (len(chunks), vocab): the logits of each sequence's last new token."""
    batch = PagedBatch(model.config, pool, chunks, model.embed.weight.device)
    return model(batch.tokens, start_pos=batch.positions, cache=batch, last_only=True)[0]


def check_chunks(config: ModelConfig, pool: BlockPool, chunks: list[SequenceChunk]) -> None:
    """Refuse a step that cannot run, saying which sequence is wrong and what to do about it."""
    if not chunks:
        raise LlmlabError("the batch is empty: give forward_batch at least one sequence to run")
    for i, chunk in enumerate(chunks):
        if len(chunk.tokens) == 0:
            raise LlmlabError(f"sequence {i} has no new tokens: every sequence in a step runs at least one "
                              f"(a decode runs its last sampled token); leave a sequence with nothing to run "
                              f"out of the step")
        try:
            validate.token_ids(chunk.tokens, config.vocab_size)
        except LlmlabError as error:
            raise LlmlabError(f"sequence {i}: {error}") from None
        start = chunk.start_pos
        if not validate.is_int(start) or start < 0:
            raise LlmlabError(f"sequence {i} has start_pos {start!r}: it counts the tokens already in the "
                              f"sequence's blocks, an integer >= 0")
        end = start + len(chunk.tokens)
        if end > config.max_seq_len:
            raise LlmlabError(f"sequence {i} reaches position {end - 1}, past the model's context of "
                              f"{config.max_seq_len} tokens: stop a sequence before it outgrows the context")
        room = len(chunk.block_table) * pool.block_size
        if room < end:
            raise LlmlabError(f"sequence {i}'s block table has {len(chunk.block_table)} blocks of "
                              f"{pool.block_size} tokens, room for {room} positions, but its tokens reach position "
                              f"{end - 1}: give it {-(-end // pool.block_size) - len(chunk.block_table)} more "
                              f"block(s) before the step")
        wrong = [b for b in chunk.block_table if not validate.is_int(b) or not 0 <= b < pool.n_blocks]
        if wrong:
            raise LlmlabError(f"sequence {i}'s block table names block {wrong[0]!r}, but the pool's blocks are "
                              f"0 .. {pool.n_blocks - 1}: take block ids from the pool the step writes into")
