"""The block manager and its prefix cache: the hard cases one by one, then thousands of random
operations checked against an independent recount and a simulated KV pool."""

import random

import pytest

from llmlab.errors import LlmlabError
from llmlab.serve.blocks import BlockKey, BlockManager, NoFreeBlocks


def computed(manager: BlockManager, seq_id, prompt: list[int]) -> int:
    """Allocate and 'run the forward pass' over the whole prompt; return the tokens hit."""
    hit = manager.allocate(seq_id, prompt)
    manager.mark_computed(seq_id, prompt)
    return hit


def check_invariants(manager: BlockManager) -> None:
    """Everything the manager stores, recounted from the block tables alone."""
    references = [0] * manager.n_blocks
    for table in manager.tables.values():
        assert len(set(table)) == len(table), f"a block twice in one table: {table}"
        for block in table:
            references[block] += 1
    assert manager.ref_counts == references
    in_use = {b for b in range(manager.n_blocks) if references[b] > 0}
    free, evictable = set(manager.free_blocks), set(manager.evictable)
    assert len(free) == len(manager.free_blocks), "a block twice on the free list"
    assert not (free & evictable) and not (free & in_use) and not (evictable & in_use)
    assert free | evictable | in_use == set(range(manager.n_blocks))
    assert manager.n_in_use + manager.n_free + manager.n_evictable == manager.n_blocks
    assert manager.n_in_use == len(in_use)
    keyed = {b for b in range(manager.n_blocks) if manager.block_keys[b] is not None}
    assert not (keyed & free), "a free block still has a key"
    assert evictable <= keyed, "an evictable block without a key"
    assert {manager.cached[manager.block_keys[b]] for b in keyed} == keyed, "a key points at another block"
    assert len(manager.cached) == len(keyed)
    for seq_id, keys in manager.seq_keys.items():
        assert len(keys) <= len(manager.tables[seq_id])


def counts(manager: BlockManager):
    return (manager.n_free, manager.n_evictable, manager.n_in_use, list(manager.ref_counts),
            list(manager.evictable), len(manager.cached), dict(manager.tables), manager.prompt_tokens_queried)


def test_same_prefix_admitted_in_same_step_computes_twice_and_caches_once():
    manager = BlockManager(n_blocks=16, block_size=4)
    prompt = list(range(10))                          # two full blocks and a partial one
    assert manager.allocate("a", prompt) == 0
    # a's blocks are allocated but not yet written: b must not share them
    assert manager.allocate("b", prompt) == 0
    assert not set(manager.block_table("a")) & set(manager.block_table("b"))
    manager.mark_computed("a", prompt)
    manager.mark_computed("b", prompt)
    cached_copies = manager.block_table("a")[:2]      # a registered first: its blocks are the cached ones
    assert sorted(manager.cached.values()) == sorted(cached_copies)
    check_invariants(manager)
    manager.free("a")
    manager.free("b")
    check_invariants(manager)
    assert (manager.n_evictable, manager.n_free, manager.n_in_use) == (2, 14, 0)   # nothing leaked
    assert manager.allocate("c", prompt) == 8
    assert manager.block_table("c")[:2] == cached_copies


def test_a_later_request_hits_only_blocks_already_computed():
    manager = BlockManager(n_blocks=16, block_size=4)
    prompt = list(range(12))
    manager.allocate("a", prompt)
    manager.mark_computed("a", prompt[:6])            # chunked prefill: one block full so far
    assert manager.allocate("b", prompt) == 4
    assert manager.block_table("b")[0] == manager.block_table("a")[0]
    assert manager.block_table("b")[1] != manager.block_table("a")[1]


@pytest.mark.parametrize("length, expected_hit", [(12, 8), (13, 12), (4, 0), (5, 4)])
def test_full_prefix_hit_leaves_at_least_one_token_to_compute(length, expected_hit):
    manager = BlockManager(n_blocks=16, block_size=4)
    prompt = list(range(100, 100 + length))
    computed(manager, "a", prompt)
    assert manager.allocate("b", prompt) == expected_hit
    a, b = manager.block_table("a"), manager.block_table("b")
    n_shared = expected_hit // 4
    assert b[:n_shared] == a[:n_shared]
    assert not set(b[n_shared:]) & set(a), "the block b computes into must be its own"
    manager.mark_computed("b", prompt)                # b's recomputed last block duplicates a's
    check_invariants(manager)
    manager.free("a")
    manager.free("b")
    assert manager.n_evictable == len(manager.cached) == length // 4
    check_invariants(manager)


def test_a_shared_block_in_use_is_never_evicted():
    manager = BlockManager(n_blocks=5, block_size=2)
    computed(manager, "a", [1, 2, 3, 4, 5])           # 3 blocks; [1, 2] and [3, 4] are cached
    shared = manager.block_table("a")[0]
    manager.free("a")
    assert manager.allocate("b", [1, 2, 9]) == 2      # both revive and share block [1, 2]
    assert manager.allocate("e", [1, 2, 8]) == 2
    assert manager.block_table("b")[0] == manager.block_table("e")[0] == shared
    assert (manager.n_free, manager.n_evictable, manager.ref_counts[shared]) == (1, 1, 2)
    assert not manager.can_allocate([7] * 6)
    with pytest.raises(NoFreeBlocks):
        manager.allocate("c", [7] * 6)                # 3 blocks: only by evicting the shared one
    manager.allocate("c", [7] * 4)                    # takes the free block and evicts [3, 4]
    assert shared not in manager.block_table("c") and manager.ref_counts[shared] == 2
    check_invariants(manager)
    for seq_id in ("b", "e", "c"):
        manager.free(seq_id)
    assert manager.allocate("d", [1, 2, 3, 4, 5]) == 2   # [1, 2] still hits; [3, 4] was evicted
    assert manager.block_table("d")[0] == shared
    check_invariants(manager)


def test_the_same_tokens_after_a_different_prefix_do_not_hit():
    manager = BlockManager(n_blocks=16, block_size=2)
    computed(manager, "a", [1, 2, 5, 6, 0])
    assert manager.allocate("b", [3, 4, 5, 6, 0]) == 0    # [5, 6] is cached, but after [1, 2]
    assert manager.allocate("c", [5, 6, 0]) == 0
    assert manager.allocate("d", [1, 2, 5, 6, 0]) == 4


def test_keys_compare_whole_prefixes_not_hashes():
    """Two prefixes whose hashes clash are still different keys; equal chains thousands of blocks
    long compare equal without recursing."""
    first, second = BlockKey(BlockKey(None, (1,)), (5,)), BlockKey(BlockKey(None, (2,)), (5,))
    second._hash = first._hash                        # a 64-bit clash, forced
    assert first != second
    long_chains = []
    for _ in range(2):
        key = None
        for i in range(5000):
            key = BlockKey(key, (i, i + 1))
        long_chains.append(key)
    assert long_chains[0] == long_chains[1] and long_chains[0] is not long_chains[1]
    assert long_chains[0] != BlockKey(long_chains[1].parent, (0, 0))


def cache_three_blocks() -> BlockManager:
    """A pool of 4 blocks of 2 tokens: [1, 1], [2, 2], [3, 3] cached in that order, one block free."""
    manager = BlockManager(n_blocks=4, block_size=2)
    for seq_id, prompt in (("a", [1, 1]), ("b", [2, 2]), ("c", [3, 3])):
        computed(manager, seq_id, prompt)
        manager.free(seq_id)
    assert (manager.n_evictable, manager.n_free) == (3, 1)
    return manager


def hits(manager: BlockManager, first_tokens: list[int]) -> list[int]:
    """Tokens hit by each prompt first_tokens[i] repeated, then 0; each is freed before the next."""
    found = []
    for token in first_tokens:
        found.append(manager.allocate("probe", [token, token, 0]))
        manager.free("probe")
    return found


def test_least_recently_used_cached_block_is_evicted_first():
    manager = cache_three_blocks()
    manager.allocate("d", [9, 9, 9])                  # the free block, and the oldest cached: [1, 1]
    manager.free("d")
    assert hits(manager, [2, 3, 1]) == [2, 2, 0]


def test_a_hit_refreshes_recency():
    manager = cache_three_blocks()
    assert hits(manager, [1]) == [2]                  # [1, 1] is now the most recently used
    manager.allocate("d", [9, 9, 9])                  # so [2, 2] goes
    manager.free("d")
    assert hits(manager, [1, 3, 2]) == [2, 2, 0]


def test_a_failed_allocate_or_reserve_changes_nothing():
    manager = BlockManager(n_blocks=5, block_size=2)
    computed(manager, "a", [1, 2, 3, 4, 5])
    manager.free("a")                                 # 2 evictable, 3 free
    computed(manager, "b", [1, 2, 8])                 # hits [1, 2] and takes a free block
    before = counts(manager)
    assert not manager.can_allocate([1, 2, 3, 4] + [0] * 6)
    with pytest.raises(NoFreeBlocks):
        manager.allocate("c", [1, 2, 3, 4] + [0] * 6)     # 2 hits + 3 new, with 3 available
    assert counts(manager) == before
    with pytest.raises(NoFreeBlocks):
        manager.reserve("b", 3 + 2 * 4)
    assert counts(manager) == before
    check_invariants(manager)


def test_reserve_takes_a_block_only_when_the_last_one_is_full():
    manager = BlockManager(n_blocks=8, block_size=4)
    manager.allocate("a", [1, 2, 3])
    manager.reserve("a", 4)
    assert len(manager.block_table("a")) == 1
    manager.reserve("a", 5)
    assert len(manager.block_table("a")) == 2
    manager.reserve("a", 3)                           # never shrinks
    manager.reserve("a", 5 + 4)                       # speculative: room for several tokens at once
    assert len(manager.block_table("a")) == 3
    assert manager.n_in_use == 3


def test_decoded_blocks_are_cached_too_and_preemption_is_free():
    manager = BlockManager(n_blocks=8, block_size=2)
    tokens = [1, 2, 3]
    computed(manager, "a", tokens)
    for token in (4, 5, 6):                           # decode: one token per step
        tokens.append(token)
        manager.reserve("a", len(tokens))
        manager.mark_computed("a", tokens)
    manager.free("a")                                 # preempted: recompute it later
    assert manager.allocate("a", tokens) == 4         # [1, 2], [3, 4] hit; [5, 6] is recomputed
    assert manager.prompt_tokens_queried == 9 and manager.prompt_tokens_hit == 4
    assert manager.hit_rate == pytest.approx(4 / 9)


def test_reset_prefix_cache_forgets_every_key():
    manager = BlockManager(n_blocks=8, block_size=2)
    computed(manager, "a", [1, 2, 3])
    computed(manager, "b", [5, 6, 7])
    manager.free("a")
    manager.reset_prefix_cache()
    check_invariants(manager)
    assert (manager.n_evictable, manager.n_in_use) == (0, 2)
    assert manager.allocate("c", [1, 2, 3]) == 0
    assert manager.allocate("d", [5, 6, 7]) == 0


def test_random_operations_keep_the_invariants_and_never_serve_wrong_kv():
    """A simulated pool records which prefix each block's KV was computed for: every hit must be the
    prompt's own prefix, and a forward pass may only write into blocks no one else holds."""
    rng = random.Random(0)
    bs = 3
    manager = BlockManager(n_blocks=30, block_size=bs)
    prefixes = [[rng.randrange(3) for _ in range(n)] for n in (0, 3, 6, 7, 9)]
    written: dict[int, tuple] = {}                    # block -> the tokens up to its end, as computed
    running: dict[int, tuple[list[int], int]] = {}    # seq -> (tokens, how many have their KV)

    def forward(seq, end):
        tokens, start = running[seq]
        table = manager.block_table(seq)
        for position in range(start, end):
            block = table[position // bs]
            assert manager.ref_counts[block] == 1 and manager.block_keys[block] is None, "write into a shared block"
            written[block] = tuple(tokens[:(position // bs + 1) * bs])
        running[seq] = (tokens, end)
        manager.mark_computed(seq, tokens[:end])

    operations = {"allocate": 0, "full": 0, "hit": 0, "prefill": 0, "decode": 0, "free": 0, "evict": 0}
    for step in range(4000):
        choice, n_cached = rng.random(), len(manager.cached)
        if choice < 0.35 or not running:
            prompt = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(1, 7))]
            before = counts(manager)
            if not manager.can_allocate(prompt):
                with pytest.raises(NoFreeBlocks):
                    manager.allocate(step, prompt)
                assert counts(manager) == before
                operations["full"] += 1
            else:
                hit = manager.allocate(step, prompt)
                assert hit % bs == 0 and hit < len(prompt)
                for i, block in enumerate(manager.block_table(step)[:hit // bs]):
                    assert written[block] == tuple(prompt[:(i + 1) * bs]), "a hit served another prefix's KV"
                running[step] = (prompt, hit)
                operations["allocate"] += 1
                operations["hit"] += hit > 0
        elif choice < 0.8:
            seq = rng.choice(list(running))
            tokens, done = running[seq]
            if done < len(tokens):                    # (chunked) prefill
                forward(seq, rng.randint(done + 1, len(tokens)))
                operations["prefill"] += 1
            else:                                     # decode one token
                if manager.n_available == 0 and len(tokens) % bs == 0:
                    before = counts(manager)
                    with pytest.raises(NoFreeBlocks):
                        manager.reserve(seq, len(tokens) + 1)
                    assert counts(manager) == before
                    operations["full"] += 1
                else:
                    manager.reserve(seq, len(tokens) + 1)
                    tokens.append(rng.randrange(3))
                    forward(seq, len(tokens))
                    operations["decode"] += 1
        else:
            seq = rng.choice(list(running))
            manager.free(seq)
            del running[seq]
            operations["free"] += 1
        operations["evict"] += len(manager.cached) < n_cached
        check_invariants(manager)
    assert min(operations.values()) >= 50, operations   # every path was exercised


@pytest.mark.bad_input(kind="a block manager given a non-positive size, an unknown sequence or an empty prompt",
                       gets="LlmlabError saying what to give it")
@pytest.mark.parametrize("make, message", [
    (lambda: BlockManager(0, 16), "n_blocks must be a positive"),
    (lambda: BlockManager(-3, 16), "n_blocks must be a positive"),
    (lambda: BlockManager(8, 0), "block_size must be a positive"),
    (lambda: BlockManager(8, 2.5), "block_size must be a positive"),
    (lambda: BlockManager(8, 4).block_table("x"), "no sequence 'x'.*allocate it first"),
    (lambda: BlockManager(8, 4).free("x"), "no sequence 'x'"),
    (lambda: BlockManager(8, 4).reserve("x", 3), "no sequence 'x'"),
    (lambda: BlockManager(8, 4).mark_computed("x", [1]), "no sequence 'x'"),
    (lambda: BlockManager(8, 4).allocate("x", []), "the prompt is empty"),
])
def test_bad_arguments_say_what_to_do(make, message):
    with pytest.raises(LlmlabError, match=message):
        make()


def test_allocating_an_existing_sequence_or_computing_past_its_blocks_is_refused():
    manager = BlockManager(8, 4)
    manager.allocate("x", [1, 2, 3])
    with pytest.raises(LlmlabError, match="already has blocks; free it"):
        manager.allocate("x", [1, 2, 3])
    with pytest.raises(LlmlabError, match="reserve room"):
        manager.mark_computed("x", [1, 2, 3, 4, 5])
    assert manager.n_in_use == 1
