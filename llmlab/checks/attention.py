"""Checks for the exercises of notebooks/03_attention.ipynb.

Expected answers come from PyTorch (`torch.logsumexp`, tensor sizes on the meta device) and from
llmlab's own `Attention` module built with other head counts, never from a stored number.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llmlab.config import ModelConfig
from llmlab.model import Attention

from . import unanswered


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
