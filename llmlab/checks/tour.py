"""Checks for the exercises of notebooks/00_tour.ipynb.

The KV-cache size is measured on a cache the engine really allocates; the greedy loop is compared token
by token with `llm.generate_ids`, the engine's own decoding (with a KV cache, so computed another way).
"""

from __future__ import annotations

from ..kv_cache import KVCache
from . import check, unanswered


@check
def check_kv_bytes(answer, config) -> None:
    """`answer`: an int, the bytes of SmolLM2's fp32 KV cache for one sequence of 8,192 tokens."""
    if unanswered(answer, "kv_bytes"):
        return
    measured = KVCache(config, max_seq_len=16).nbytes * (8192 // 16)      # a real cache of 16 tokens, scaled up
    assert answer != measured // 2, "that is half of it: the cache holds a key AND a value vector"
    assert answer != measured * config.n_heads // config.n_kv_heads, (
        "that counts every query head; only the key/value heads (n_kv_heads) are cached")
    assert answer == measured, (
        f"{answer:,} bytes is not right: count keys and values, every layer, every KV head, head_dim numbers of 4 bytes")
    print(f"Correct: {answer / 2**20:.0f} MiB, more than the 4-bit weights of the whole model.")


@check
def check_greedy_generate(greedy_generate, llm, prompt: str = "The capital of France is", n: int = 8) -> None:
    """`greedy_generate(llm, ids, n) -> list[int]`: the n token ids greedy decoding appends to `ids`."""
    ids = llm.tokenizer.encode(prompt)
    got = greedy_generate(llm, list(ids), n)
    if unanswered(got, "greedy_generate"):
        return
    want = list(llm.generate_ids(ids, max_new_tokens=n, stop_ids=set()))
    got = [int(t) for t in got]
    if got[:len(ids)] == ids and len(got) == len(ids) + n:
        raise AssertionError("you returned the prompt followed by the new tokens; return only the n new ones")
    assert len(got) == n, f"asked for {n} new tokens, got {len(got)}: one forward pass, one new token, {n} times"
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if at is not None:
        logits = llm.logits(ids + want[:at])
        first_row = int(logits[0].argmax())
        hint = ("that is the argmax of the first row; the next token is scored by the LAST row, logits[-1]"
                if got[at] == first_row else
                "take the argmax of the last row of llm.logits(ids), append it to ids, and run again")
        raise AssertionError(f"new token {at} is {got[at]} ({llm.tokenizer.decode([got[at]])!r}), "
                             f"not the model's most likely next token there: {hint}")
    print(f"Correct: {llm.tokenizer.decode(got)!r}, the same {n} tokens as llm.generate_ids, which computes them "
          f"another way (with a KV cache, notebook 06).")
