"""Tokenizer speed: llmlab's BPE (cold and warm word cache) against Hugging Face's Rust tokenizer."""

from __future__ import annotations

import statistics
import time

from ..corpus import shakespeare_text

TIMER = "time.perf_counter"


def tokenizer_benchmark(llmlab_tokenizer, hf_tokenizer, n_bytes: int = 1_000_000, runs: int = 3) -> dict:
    """Seconds to encode n_bytes of Shakespeare in one call, median of `runs` after one untimed round.

    llmlab's tokenizer remembers every word it has encoded, so it is timed twice: cold (the memory
    emptied before the call, so every distinct word goes through BPE) and warm (right after a cold
    call: mostly dictionary look-ups). Hugging Face's Rust tokenizer keeps a small word cache of its
    own that cannot be emptied; it is warm from the untimed round.
    """
    text = shakespeare_text(n_bytes).encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")

    def llmlab_cold():
        llmlab_tokenizer.word_cache.clear()
        start = time.perf_counter()
        return llmlab_tokenizer.encode(text), time.perf_counter() - start

    def timed(encode):
        start = time.perf_counter()
        return encode(), time.perf_counter() - start

    encoders = {
        "llmlab_cold": llmlab_cold,
        "llmlab": lambda: timed(lambda: llmlab_tokenizer.encode(text)),
        "hf": lambda: timed(lambda: hf_tokenizer(text, add_special_tokens=False)["input_ids"]),
    }
    times = {name: [] for name in encoders}
    n_tokens = {}
    for r in range(runs + 1):
        for name, encode in encoders.items():
            ids, seconds = encode()
            n_tokens[name] = len(ids)
            if r > 0:
                times[name].append(seconds)
    n = len(text.encode("utf-8"))
    result = {
        "n_bytes": n,
        "method": f"{n:,} bytes of Shakespeare (every play in file-name order, cut), encoded in one call without "
                  f"special tokens; 1 untimed round, then the median of {runs}; the three take turns each round. "
                  f"llmlab_cold: llmlab's word cache emptied before each call; llmlab: warm cache. hf: transformers' "
                  f"fast (Rust) tokenizer built from the same GGUF. Ratios: llmlab speed / hf speed. Timer {TIMER}.",
    }
    for name, t in times.items():
        median = statistics.median(t)
        result[name] = {"seconds": t, "seconds_median": median, "n_tokens": n_tokens[name],
                        "tokens_per_s": n_tokens[name] / median, "mb_per_s": n / median / 1e6}
    result["ratio_llmlab_over_hf"] = result["hf"]["seconds_median"] / result["llmlab"]["seconds_median"]
    result["ratio_llmlab_cold_over_hf"] = result["hf"]["seconds_median"] / result["llmlab_cold"]["seconds_median"]
    return result

