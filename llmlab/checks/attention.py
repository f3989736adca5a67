"""Checks for the exercises of notebooks/03_attention.ipynb.

Expected answers come from PyTorch (`torch.logsumexp`, tensor sizes on the meta device, q k^T / sqrt(d_k)),
from llmlab's causal mask and its SDPA attention backend run on the real model's queries, keys and values,
and from llmlab's own `Attention` module built with other head counts, never from a stored number.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from llmlab import probe
from llmlab.attention import causal_mask as engine_causal_mask, sdpa_attention
from llmlab.config import ModelConfig
from llmlab.model import Attention

from . import check, unanswered
from .locate import Step, locate


@check
def check_logsumexp(logsumexp) -> None:
    """`logsumexp(z)`: log Σ_j exp(z_j) over the last dimension, finite for huge scores and masked (-inf) ones."""
    # a function that still returns the placeholder None counts as unanswered
    if unanswered(logsumexp and logsumexp(torch.zeros(1, 2)), "logsumexp"):
        return
    gen = torch.Generator().manual_seed(3)
    cases = {
        "ordinary scores": torch.randn(4, 10, generator=gen),
        "huge scores (exp overflows fp32)": torch.tensor([[1000.0, 999.0, 998.0], [120.0, -5.0, 60.0]]),
        "very negative scores (exp underflows to 0)": torch.tensor([[-1000.0, -1001.0, -1002.0]]),
        "a masked row, as after the causal mask": torch.tensor([[3.0, 1.0, float("-inf"), float("-inf")]]),
        "fp16 scores above 11 (exp overflows fp16)": (torch.randn(3, 8, generator=gen) * 20).half(),
    }
    for name, z in cases.items():
        got = logsumexp(z.clone())
        expected = torch.logsumexp(z.float(), dim=-1)
        assert got.shape == expected.shape, (
            f"{name}: expected shape {tuple(expected.shape)} (one number per row), got {tuple(got.shape)}")
        assert torch.isfinite(got).all(), (
            f"{name}: got {got.tolist()}. exp(z) overflowed (inf) or every term underflowed (log 0 = -inf): "
            f"use log Σ exp(z_j) = c + log Σ exp(z_j - c) with c = max_j z_j")
        torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3, msg=lambda m: f"{name}: {m}")
    print(f"Correct: finite and equal to torch.logsumexp on {len(cases)} kinds of scores.")


def _attention_parameters(config: ModelConfig) -> int:
    with torch.device("meta"):    # shapes only: no memory for the weights
        return sum(p.numel() for p in Attention(config).parameters()) * config.n_layers


@check
def check_mha_parameters(answer, config: ModelConfig) -> None:
    """`answer`: the attention parameters of all layers if every query head had its own key/value head."""
    if unanswered(answer, "mha_params"):
        return
    expected = _attention_parameters(replace(config, n_kv_heads=config.n_heads))
    gqa = _attention_parameters(config)
    assert answer != gqa, (
        "that is the grouped-query count, the model as it is: with multi-head attention W_k and W_v "
        "have n_heads * head_dim rows, like W_q")
    assert answer == expected, (
        f"{answer:,} is not right: count W_q, W_k, W_v and W_o (each dim × n_heads·head_dim when every "
        f"query head has its own K and V), in each of the {config.n_layers} layers")
    print(f"Correct: {expected:,} parameters, {expected / gqa:.2f}× the {gqa:,} of grouped-query attention.")


@check
def check_score_matrix_bytes(answer, config: ModelConfig, seq_len: int, bytes_per_value: int = 4) -> None:
    """`answer`: bytes of one layer's score matrices (all query heads) for `seq_len` tokens."""
    if unanswered(answer, "score_matrix_bytes"):
        return
    dtype = {2: torch.float16, 4: torch.float32}[bytes_per_value]
    expected = torch.empty(config.n_heads, seq_len, seq_len, dtype=dtype, device="meta").nbytes
    assert answer != expected // config.n_heads, "that is one head: every query head has its own n×n scores"
    assert answer != expected // config.n_heads * config.n_kv_heads, (
        "K is shared by query heads, the scores are not: each of the n_heads query heads has its own matrix")
    assert answer == expected, (
        f"{answer:,} is not right: one score per (query head, query position, key position), "
        f"{bytes_per_value} bytes each")
    print(f"Correct: {expected / 2**30:.2f} GiB for one layer's scores at {seq_len:,} tokens.")


SCORES_HINT = "scores[h, i, j] = q[h, i] · k[h, j] / sqrt(d_k), with d_k the head size (the last dimension of q)."
MASK_HINT = ("causal_mask(n)[i, j] is True where query i may see key j, that is key j <= query i: "
             "the diagonal included, everything above it masked.")
OUTPUT_HINT = ("softmax over the keys (the last dimension) of the masked scores, times v. If head 0 is right "
               "and a later head wrong, check which key/value head each query head reads: query head h "
               "reads key/value head h // (n_heads // n_kv_heads).")
SCORE_DIMS = ("head", "query position", "key position")


def attention_steps(causal_mask, attention_scores, attention, llm, ids: list[int]):
    """For every layer: the learner's scores, masked scores and attention output, each computed from that
    layer's real queries, keys and values (the engine's, so that a mistake shows where it is made)."""
    n, group = len(ids), llm.config.n_heads // llm.config.n_kv_heads
    engine_mask = engine_causal_mask(n, n, llm.device)
    mask = causal_mask(n)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool, (
        f"causal_mask(n) should return a bool tensor (True: may see), got "
        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    assert mask.shape == (n, n), f"causal_mask({n}) should have shape ({n}, {n}), got {tuple(mask.shape)}"
    for layer, (x, cos, sin) in enumerate(probe.attention_inputs(llm, ids)):
        q, k, v = probe.project_qkv(llm.model.layers[layer].attention, x, cos, sin)
        k_per_query_head = k.repeat_interleave(group, dim=0)                # (n_heads, n, d_k)
        scores = q @ k_per_query_head.transpose(-2, -1) / math.sqrt(q.shape[-1])
        yield Step("scores", attention_scores(q.clone(), k_per_query_head.clone()), scores,
                   SCORE_DIMS, layer, SCORES_HINT)
        yield Step("after mask", scores.masked_fill(~mask, float("-inf")),
                   scores.masked_fill(~engine_mask, float("-inf")), SCORE_DIMS, layer, MASK_HINT)
        yield Step("output", attention(q.clone(), k.clone(), v.clone()),
                   sdpa_attention(q[None], k[None], v[None])[0], ("head", "position", "channel"),
                   layer, OUTPUT_HINT)


@check
def check_attention(causal_mask, attention_scores, attention, llm, prompt: str) -> None:
    """Compare the three functions with llmlab on every layer's real queries, keys and values for `prompt`:
    `causal_mask(n)` -> (n, n) bool; `attention_scores(q, k)`, q and k (n_heads, n, d_k) -> (n_heads, n, n);
    `attention(q, k, v)`, q (n_heads, n, d_k), k and v (n_kv_heads, n, d_k) -> (n_heads, n, d_k)."""
    c = llm.config
    q, kv = torch.zeros(c.n_heads, 2, c.head_dim), torch.zeros(c.n_kv_heads, 2, c.head_dim)   # two tokens
    tries = {"causal_mask": lambda: causal_mask(2), "attention_scores": lambda: attention_scores(q, q),
             "attention": lambda: attention(q, kv, kv)}
    for name, attempt in tries.items():
        if unanswered(attempt(), name):        # a function that still returns the placeholder None
            return
    ids = llm.tokenizer.encode(prompt)
    with torch.inference_mode():
        compared = locate(attention_steps(causal_mask, attention_scores, attention, llm, ids))
    print(f"Correct: scores, mask and grouped-query attention equal llmlab's in all {llm.config.n_layers} "
          f"layers ({compared} tensors compared on {len(ids)} tokens).")
