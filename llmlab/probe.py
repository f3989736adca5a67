"""Look inside the running model: the queries, keys, values and attention weights of its real heads.

One forward pass runs with a forward pre-hook on every layer's `Attention` module, which records
the module's input: the RMS-normalised residual stream x and the RoPE cos/sin tables. The layer's own
projections then recompute

    q = RoPE(x W_q^T),  k = RoPE(x W_k^T),  v = x W_v^T
    weights = softmax(q k^T / sqrt(d_k) + M)          M: the causal mask

for every head. The engine itself never materialises the weights (its default SDPA backend fuses
them away); the tests check that weights @ v equals what the engine's attention really produced.
"""

from __future__ import annotations

import math

import torch

from .attention import causal_mask
from .model import apply_rope


@torch.inference_mode()
def attention_inputs(llm, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, cos, sin) seen by each layer's attention on `ids`: x (seq, dim), cos and sin (seq, head_dim)."""
    captured = []

    def record(module, args):
        x, cos, sin = args[:3]
        captured.append((x[0], cos, sin))

    handles = [block.attention.register_forward_pre_hook(record) for block in llm.model.layers]
    try:
        llm.model(torch.tensor([ids], device=llm.device), last_only=True)  # the LM head is not needed
    finally:
        for handle in handles:
            handle.remove()
    return captured


def project_qkv(attention, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
    """One layer's queries (n_heads, seq, head_dim), keys and values (n_kv_heads, seq, head_dim) for
    input x (seq, dim). Without cos/sin, q and k are returned before RoPE."""
    seq = x.shape[0]

    def heads(linear, n):                                    # (seq, n * head_dim) -> (n, seq, head_dim)
        return linear(x).view(seq, n, attention.head_dim).transpose(0, 1)

    q, k = heads(attention.wq, attention.n_heads), heads(attention.wk, attention.n_kv_heads)
    v = heads(attention.wv, attention.n_kv_heads)
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


@torch.inference_mode()
def queries_keys_values(llm, ids: list[int], layer: int, rope: bool = True):
    """q (n_heads, seq, head_dim), k and v (n_kv_heads, seq, head_dim) of `layer` on `ids`."""
    x, cos, sin = attention_inputs(llm, ids)[layer]
    attention = llm.model.layers[layer].attention
    return project_qkv(attention, x, cos, sin) if rope else project_qkv(attention, x)


def weights_from_qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_k) + M) for q (n_heads, seq, d_k) and k (n_kv_heads, seq, d_k), in fp32.
    Query head h reads key head h // (n_heads // n_kv_heads), as in grouped-query attention."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])   # (n_heads, seq, seq)
    scores = scores.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


@torch.inference_mode()
def attention_weights(llm, ids: list[int], layer: int) -> torch.Tensor:
    """The attention weights of every head of `layer` on `ids`: (n_heads, seq, seq), rows sum to 1."""
    q, k, _ = queries_keys_values(llm, ids, layer)
    return weights_from_qk(q, k)


@torch.inference_mode()
def all_attention_weights(llm, ids: list[int]) -> torch.Tensor:
    """Every head of every layer, from one forward pass: (n_layers, n_heads, seq, seq)."""
    inputs = attention_inputs(llm, ids)
    return torch.stack([
        weights_from_qk(*project_qkv(block.attention, x, cos, sin)[:2])
        for block, (x, cos, sin) in zip(llm.model.layers, inputs)
    ])


def previous_token_score(weights: torch.Tensor) -> torch.Tensor:
    """Mean weight a query puts on the token just before it, over queries 1..seq-1: (..., seq, seq) -> (...)."""
    return weights.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)


def first_token_score(weights: torch.Tensor) -> torch.Tensor:
    """Mean weight a query puts on position 0 (an "attention sink"), over queries 1..seq-1 (query 0
    has nothing else to attend to): (..., seq, seq) -> (...)."""
    return weights[..., 1:, 0].mean(-1)
