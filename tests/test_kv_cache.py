"""KV caches: every layout against the plain path (recompute, or the contiguous fp32 cache)."""

import math

import pytest
import torch

from llmlab.config import preset
from llmlab.errors import LlmlabError
from llmlab.generate import decode_one_token, prefill
from llmlab.kv_cache import BlockPool, KVCache, PagedKVCache, QuantizedKVCache, make_cache, quantize_int8

PROMPT = "In the beginning of the story, the old sailor told the children"


def test_greedy_tokens_identical_without_cache_static_and_paged(llm):
    """Exact maths: the paged cache stores the same fp32 numbers, only elsewhere in memory."""
    ids = llm.tokenizer.encode(PROMPT)
    runs = {kind: list(llm.generate_ids(ids, 64, stop_ids=set(), kv_cache=kind)) for kind in ("static", "paged")}
    runs["recompute"] = list(llm.generate_ids(ids, 64, stop_ids=set(), use_cache=False))
    assert runs["static"] == runs["paged"] == runs["recompute"]


@torch.inference_mode()
def teacher_forced_logits(model, ids: list[int], cache) -> torch.Tensor:
    """Logits at every step of decoding `ids` after the first 8, all through the given cache."""
    logits = [prefill(model, torch.tensor([ids[:8]]), cache)[0]]
    for pos in range(8, len(ids) - 1):
        logits.append(decode_one_token(model, torch.tensor([[ids[pos]]]), pos, cache)[0])
    return torch.stack(logits)


@pytest.fixture(scope="module")
def generated_256(llm):
    """A prompt plus 256 greedily generated tokens, and the fp32 cache's logits along them."""
    ids = llm.tokenizer.encode(PROMPT)
    ids += list(llm.generate_ids(ids, 256, stop_ids=set()))
    return ids, teacher_forced_logits(llm.model, ids, KVCache(llm.config, len(ids)))


@pytest.mark.parametrize("kind", ["kv-int8", "kv-bf16", "kv-fp16"])
def test_reduced_precision_caches_stay_close_over_256_tokens(llm, generated_256, kind):
    """Teacher-forced over 256 generated tokens so both runs see the same sequence.

    Tolerance: int8 stores each K/V element within scale/2 = max|x|/254 (0.4% of the vector's
    largest value); bf16 rounds to 8 mantissa bits (0.4%), fp16 to 11 bits (0.05%). Through
    softmax and 30 layers these move logits (size ~20) by a few tenths at most; the issue asks for
    top-1 agreement >= 99% for int8, and we hold bf16 and fp16 to the same bar.
    """
    ids, reference = generated_256
    got = teacher_forced_logits(llm.model, ids, make_cache(kind, llm.config, len(ids), torch.float32, "cpu"))
    agreement = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    worst = (got - reference).abs().max().item()
    assert agreement >= 0.99, f"{kind}: top-1 agreement {agreement:.2%}"
    assert worst <= {"kv-int8": 1.0, "kv-bf16": 1.0, "kv-fp16": 0.1}[kind], f"{kind}: max |logit diff| {worst:.3f}"


def test_int8_error_is_at_most_half_a_step():
    x = torch.randn(2, 3, 50, 64) * torch.rand(2, 3, 50, 1) * 10
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.all((q * scale - x).abs() <= scale / 2 + 1e-6)
    assert torch.equal(quantize_int8(torch.zeros(4, 64))[0], torch.zeros(4, 64, dtype=torch.int8))


def test_cache_bytes_match_the_formula():
    config = preset("smollm2-135m")
    # 2 (K and V) * layers * kv_heads * head_dim * tokens * bytes
    assert KVCache(config, 100).nbytes == 2 * 30 * 3 * 64 * 100 * 4 == config.kv_cache_bytes(100, bytes_per_value=4)
    assert KVCache(config, 100, dtype=torch.bfloat16).nbytes == config.kv_cache_bytes(100, bytes_per_value=2)
    # int8: one byte per value plus one fp32 scale per (layer, head, token) for K and for V
    assert QuantizedKVCache(config, 100).nbytes == config.kv_cache_bytes(100, bytes_per_value=1) + 2 * 30 * 3 * 100 * 4
    pool = BlockPool(config, n_blocks=7, block_size=16)
    assert pool.nbytes == config.kv_cache_bytes(7 * 16, bytes_per_value=4)


def test_paged_cache_takes_blocks_as_it_grows_and_never_moves_data():
    config = preset("smollm2-135m", n_layers=2)
    pool = BlockPool(config, n_blocks=10, block_size=4)
    seq = PagedKVCache(pool)
    k = torch.randn(1, 3, 6, 64)
    seq.update(0, 0, k, k)
    assert len(seq.block_table) == math.ceil(6 / 4)
    first_block = pool.block(0, seq.block_table[0]).clone()
    more = torch.randn(1, 3, 1, 64)
    keys, _ = seq.update(0, 6, more, more)
    assert torch.equal(pool.block(0, seq.block_table[0]), first_block)   # appending moved nothing
    assert torch.equal(keys, torch.cat([k, more], dim=2))
    seq.update(0, 7, more, more)                                          # position 7: still block 1
    assert len(seq.block_table) == 2
    seq.update(0, 8, more, more)                                          # position 8 opens block 2
    assert len(seq.block_table) == 3 and len(pool.free_blocks) == 7
    seq.release()
    assert len(pool.free_blocks) == 10 and seq.block_table == []


def test_two_sequences_share_a_pool_and_read_back_their_own_tokens():
    config = preset("smollm2-135m", n_layers=1)
    pool = BlockPool(config, n_blocks=8, block_size=4)
    a, b = PagedKVCache(pool), PagedKVCache(pool)
    ref_a, ref_b = KVCache(config, 32), KVCache(config, 32)
    pos_a = pos_b = 0
    for step in range(6):                  # interleave appends so the two sequences' blocks alternate
        for seq, ref, pos in ((a, ref_a, pos_a), (b, ref_b, pos_b)):
            n = 1 + step % 3
            k, v = torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64)
            got, want = seq.update(0, pos, k, v), ref.update(0, pos, k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        pos_a += 1 + step % 3
        pos_b += 1 + step % 3
    assert set(a.block_table).isdisjoint(b.block_table)


@pytest.mark.bad_input(kind='a paged KV cache that runs out of blocks', gets='LlmlabError')
def test_full_pool_is_a_clear_error():
    config = preset("smollm2-135m", n_layers=1)
    seq = PagedKVCache(BlockPool(config, n_blocks=2, block_size=4))
    with pytest.raises(LlmlabError, match="the KV block pool is full: all 2 blocks of 4 tokens"):
        seq.update(0, 0, torch.randn(1, 3, 9, 64), torch.randn(1, 3, 9, 64))


@pytest.mark.bad_input(kind='an unknown KV cache kind', gets='LlmlabError listing the kinds')
def test_unknown_cache_kind(llm):
    with pytest.raises(LlmlabError, match="unknown KV cache 'ring'"):
        llm.generate("Hello", kv_cache="ring")
