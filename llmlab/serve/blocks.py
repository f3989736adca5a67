"""The block manager: which physical KV blocks each sequence owns, and the prefix cache.

Pure bookkeeping over block ids 0 .. n_blocks-1 of a BlockPool (llmlab.kv_cache); it holds no
tensors. Every block is in exactly one of three states:

    free        refcount 0, no key: holds nothing anyone can use
    in use      refcount > 0: in the block table of that many sequences
    evictable   refcount 0, with a key: its KV is still valid and can be hit by a later prompt, until
                a new block is needed and the free list is empty; then the least recently used goes

A *full* block whose KV has been written gets a key (BlockKey: its tokens and the key of the block
before it) in the prefix cache. A new prompt walks its full blocks through the cache and shares every
block it finds, up to the first miss: those tokens need no prefill.

The API a scheduler uses:

    BlockManager(n_blocks, block_size)
    allocate(seq_id, prompt) -> int     block table for the prompt; returns how many leading prompt
                                        tokens already have their KV (a whole number of blocks, always
                                        fewer than len(prompt)). All or nothing: raises NoFreeBlocks
    can_allocate(prompt) -> bool        would allocate succeed now? (no side effects)
    reserve(seq_id, n_tokens)           room for positions 0 .. n_tokens-1: decode asks for one more
                                        token, speculative verification for k+1 more. All or nothing
    mark_computed(seq_id, tokens)       the KV of tokens (the whole sequence so far) is written: key
                                        every block that is now full
    free(seq_id)                        drop the sequence's blocks. Preempting a running sequence (to
                                        recompute it later) is just this: its full computed blocks stay
                                        cached, so re-allocating prompt + generated tokens hits them
    block_table(seq_id) -> list[int]    logical block i -> physical block id
    reset_prefix_cache()                forget every key (e.g. after the weights change)
    n_free, n_evictable, n_in_use, n_available, prompt_tokens_queried, prompt_tokens_hit, hit_rate
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import LlmlabError


class NoFreeBlocks(LlmlabError):
    """Not enough free or evictable blocks for the request; nothing was changed. A scheduler waits for
    sequences to finish, or preempts one."""


class BlockKey:
    """What a full block holds: its tokens, after the prefix named by `parent` (None: the first block).

    Keys compare exactly, token for token along the whole chain, so the same tokens after a different
    prefix are a different key, and a hit can never serve another prefix's KV. hash() only picks the
    dict bucket: two different prefixes with the same 64-bit hash cost one extra comparison, never a
    wrong hit (a digest such as SHA-256 as the key itself would make a collision a silent wrong answer).
    The hash is computed once, from the parent's hash and this block's tokens: O(block_size) per block.
    A key keeps its parent chain alive, so memory grows with the number of distinct prefixes cached.
    """

    __slots__ = ("parent", "tokens", "_hash")

    def __init__(self, parent: BlockKey | None, tokens: tuple[int, ...]):
        self.parent, self.tokens = parent, tokens
        self._hash = hash((None if parent is None else parent._hash, tokens))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        # A loop, not recursion: chains are as long as prompts. It stops at the first shared parent,
        # which is at once for a lookup that follows the keys it already hit.
        a, b = self, other
        while a is not b:
            if a is None or b is None or a._hash != b._hash or a.tokens != b.tokens:
                return False
            a, b = a.parent, b.parent
        return True


class BlockManager:
    """The block tables of every running sequence, and the prefix cache (the API: the module docstring)."""

    def __init__(self, n_blocks: int, block_size: int):
        for name, value in (("n_blocks", n_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LlmlabError(f"BlockManager: {name} must be a positive whole number, got {value!r}; "
                                  f"e.g. BlockManager(n_blocks=1024, block_size=16)")
        self.n_blocks, self.block_size = n_blocks, block_size
        self.ref_counts = [0] * n_blocks
        self.block_keys: list[BlockKey | None] = [None] * n_blocks   # the key each cached block is under
        self.cached: dict[BlockKey, int] = {}                         # the prefix cache: key -> block
        self.free_blocks = list(range(n_blocks - 1, -1, -1))          # a stack: pop() hands out block 0 first
        self.evictable: OrderedDict[int, None] = OrderedDict()       # least recently used first
        self.tables: dict[object, list[int]] = {}
        # each sequence's keys of its full computed blocks, in order; a block computed twice (see
        # mark_computed) appears here under the cached copy's key, which keeps the chain going
        self.seq_keys: dict[object, list[BlockKey]] = {}
        self.prompt_tokens_queried = self.prompt_tokens_hit = 0

    # -- what a scheduler reads

    @property
    def n_free(self) -> int:
        return len(self.free_blocks)

    @property
    def n_evictable(self) -> int:
        """Blocks no sequence uses that still hold a cached prefix."""
        return len(self.evictable)

    @property
    def n_in_use(self) -> int:
        return self.n_blocks - self.n_free - self.n_evictable

    @property
    def n_available(self) -> int:
        """Blocks a new request could take: free ones, then evictable ones."""
        return self.n_free + self.n_evictable

    @property
    def hit_rate(self) -> float:
        return self.prompt_tokens_hit / self.prompt_tokens_queried if self.prompt_tokens_queried else 0.0

    def block_table(self, seq_id) -> list[int]:
        return list(self._table(seq_id))

    # -- admitting, growing and finishing sequences

    def can_allocate(self, prompt: list[int]) -> bool:
        _, n_new, n_available = self._plan(prompt)
        return n_new <= n_available

    def allocate(self, seq_id, prompt: list[int]) -> int:
        if seq_id in self.tables:
            raise LlmlabError(f"sequence {seq_id!r} already has blocks; free it before allocating it again, "
                              f"or give the new request its own id")
        if len(prompt) == 0:
            raise LlmlabError(f"sequence {seq_id!r}: the prompt is empty; a request needs at least one token")
        hits, n_new, n_available = self._plan(prompt)
        if n_new > n_available:
            raise NoFreeBlocks(f"sequence {seq_id!r} needs {n_new} new blocks of {self.block_size} tokens for "
                               f"its {len(prompt)}-token prompt, but only {n_available} are free or evictable: "
                               f"wait for running sequences to finish, preempt one, or make the pool larger")
        for block, _ in hits:            # taken before any new block, so that eviction cannot pick them
            self._take(block)
        self.tables[seq_id] = [block for block, _ in hits] + [self._take(self._new_block()) for _ in range(n_new)]
        self.seq_keys[seq_id] = [key for _, key in hits]
        self.prompt_tokens_queried += len(prompt)
        self.prompt_tokens_hit += len(hits) * self.block_size
        return len(hits) * self.block_size

    def reserve(self, seq_id, n_tokens: int) -> None:
        table = self._table(seq_id)
        n_new = max(0, -(-n_tokens // self.block_size) - len(table))
        if n_new > self.n_available:
            raise NoFreeBlocks(f"sequence {seq_id!r} needs {n_new} more blocks for {n_tokens} tokens, but only "
                               f"{self.n_available} are free or evictable: preempt a sequence (free it and "
                               f"re-allocate it later), or make the pool larger")
        table.extend(self._take(self._new_block()) for _ in range(n_new))

    def mark_computed(self, seq_id, tokens: list[int]) -> None:
        table, keys, bs = self._table(seq_id), self.seq_keys[seq_id], self.block_size
        if len(tokens) > len(table) * bs:
            raise LlmlabError(f"sequence {seq_id!r}: {len(tokens)} tokens computed but its blocks hold "
                              f"{len(table) * bs}; reserve room before the forward pass writes the KV")
        for i in range(len(keys), len(tokens) // bs):
            key = BlockKey(keys[-1] if keys else None, tuple(tokens[i * bs:(i + 1) * bs]))
            cached_copy = self.cached.get(key)
            if cached_copy is None:
                self.cached[key] = table[i]
                self.block_keys[table[i]] = key
                keys.append(key)
            else:
                # The same block was computed elsewhere too (another sequence admitted in the same step,
                # or the last block of a full hit, recomputed): one copy stays the cached one, and ours
                # stays unkeyed and goes back to the free list when freed.
                keys.append(self.block_keys[cached_copy])

    def free(self, seq_id) -> None:
        table = self._table(seq_id)
        # The tail first, so it is evicted first: a later prompt can only reach block i through
        # blocks 0..i-1, so the leading blocks are the ones most worth keeping.
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_keys[block] is None:
                    self.free_blocks.append(block)
                else:
                    self.evictable[block] = None
        del self.tables[seq_id], self.seq_keys[seq_id]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: evictable blocks become free, blocks in use stay with their
        sequences but can no longer be hit."""
        self.free_blocks.extend(reversed(self.evictable))
        self.evictable.clear()
        self.cached.clear()
        self.block_keys = [None] * self.n_blocks

    # -- inside

    def _table(self, seq_id) -> list[int]:
        if seq_id not in self.tables:
            raise LlmlabError(f"no sequence {seq_id!r} in the block manager: allocate it first "
                              f"(or it has already been freed)")
        return self.tables[seq_id]

    def _plan(self, prompt: list[int]) -> tuple[list[tuple[int, BlockKey]], int, int]:
        """The cached blocks the prompt can share (block, key), how many new blocks it needs, and how
        many blocks are available for them. Changes nothing."""
        bs = self.block_size
        # At least one prompt token is always computed, since sampling needs its logits: a prompt of
        # exactly k blocks can hit k-1 of them and recomputes the last into a block of its own (writing
        # into the cached copy would change KV that other sequences read).
        n_hittable = (len(prompt) - 1) // bs
        hits, parent = [], None
        for i in range(n_hittable):
            block = self.cached.get(BlockKey(parent, tuple(prompt[i * bs:(i + 1) * bs])))
            if block is None:
                break
            parent = self.block_keys[block]     # continue from the cached key: comparisons stop there
            hits.append((block, parent))
        n_revived = sum(1 for block, _ in hits if self.ref_counts[block] == 0)
        return hits, -(-len(prompt) // bs) - len(hits), self.n_available - n_revived

    def _new_block(self) -> int:
        if self.free_blocks:
            return self.free_blocks.pop()
        block, _ = self.evictable.popitem(last=False)     # the least recently used cached block
        del self.cached[self.block_keys[block]]
        self.block_keys[block] = None
        return block

    def _take(self, block: int) -> int:
        """One more reference to block; an evictable block is revived (no longer evictable)."""
        self.evictable.pop(block, None)
        self.ref_counts[block] += 1
        return block
