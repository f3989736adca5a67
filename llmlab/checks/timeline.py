"""Checks for the exercises of notebooks/07_inference_timeline.ipynb.

Expected answers come from the definition of a matmul's FLOPs and bytes worked out here term by term,
and from the model's own parameters, never from a stored number.
"""

from __future__ import annotations

import torch

from . import unanswered


def check_intensity(intensity) -> None:
    """`intensity(m, k, n, bytes_per_value)`: FLOP per byte of (m x k) @ (k x n), reading both inputs
    once and writing the output once."""
    if unanswered(intensity(1, 8, 8, 2), "intensity"):
        return
    shapes = [(1, 576, 1536, 2), (1, 576, 1536, 4), (512, 576, 1536, 2), (1, 4096, 14336, 2), (7, 33, 5, 1)]
    for m, k, n, s in shapes:
        flops = 2 * m * k * n                                  # one multiply and one add per term
        moved = s * (m * k + k * n + m * n)
        got = intensity(m, k, n, s)
        assert abs(got - flops / moved) <= 1e-9 * flops / moved, (
            f"intensity({m}, {k}, {n}, {s}) = {got}; expected {flops / moved:.4f}: 2mkn FLOPs over "
            f"{s}·(mk + kn + mn) bytes")
    print("Correct. A decode matvec in bf16 does about 1 FLOP per byte; 512 tokens at once about "
          f"{intensity(512, 576, 1536, 2):.0f}: the same weights, read once, used 512 times.")


def check_decode_ceiling(answer, model: torch.nn.Module, bandwidth: float) -> None:
    """`answer`: the most tokens per second a batch-1 decode can reach if every weight is read once per
    token at `bandwidth` bytes/s (the memory roof; the KV cache and activations ignored)."""
    if unanswered(answer, "max_decode_tok_s"):
        return
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())   # a tied head: once
    expected = bandwidth / weight_bytes
    if model.config.tie_embeddings:
        twice = bandwidth / (weight_bytes + model.embed.weight.numel() * model.embed.weight.element_size())
        assert abs(answer - twice) > 1e-3 * twice, (
            "the LM head is tied to the embedding in SmolLM2: one matrix, read once per token, counted once")
    assert abs(answer - expected) <= 1e-3 * expected, (
        f"{answer:.1f} tok/s is not it: bandwidth ({bandwidth / 1e9:.1f} GB/s) / bytes of all the weights "
        f"({weight_bytes / 1e6:.0f} MB) = {expected:.1f} tok/s")
    print(f"Correct: at most {expected:.0f} tok/s from this machine's bandwidth; the bench measures what the "
          f"engine really reaches, and the gap is the time not spent streaming weights.")
