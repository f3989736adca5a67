"""Serving many requests through one model: the pieces a continuous-batching server is made of.

    blocks.py     the block manager: which physical KV blocks each sequence owns, and the prefix cache
                  (full blocks keyed by the hash chain of their tokens, reference-counted, evicted LRU)
    batch.py      one forward pass over several sequences of different lengths, flattened into one row
                  of tokens, each reading and writing its own blocks of the paged KV cache
    scheduler.py  continuous batching: requests join and leave at every step; a token budget per step
                  (chunked prefill), admission bounded by free blocks, preemption by recompute
    engine.py     the scheduler stepped on a thread of its own, for `llmlab serve` (llmlab.server)

The OpenAI-compatible server (llmlab.server) and speculative decoding (llmlab.speculative) sit beside it.
"""
