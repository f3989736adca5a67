"""Checks for the exercises of notebooks/05_decoding_and_sampling.ipynb.

Expected answers come from llmlab's filters (`top_p_filter`, `min_p_filter`, themselves tested
against brute-force references in tests/test_sampling.py) applied to the live model's next-token
distributions, never from a stored number.
"""

from __future__ import annotations

import math

import torch

from llmlab.sampling import min_p_filter, top_p_filter

from . import unanswered

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "To be, or not to be,"]


def _next_token_logits(llm) -> list[torch.Tensor]:
    return [llm.logits(llm.tokenizer.encode(prompt))[-1] for prompt in PROMPTS]


def _n_kept(filtered: torch.Tensor) -> int:
    return int((filtered > -math.inf).sum())


def _reaches_p_within_rounding(logits: torch.Tensor, p: float, n: int) -> bool:
    """True if n tokens is the right nucleus size up to float32 rounding: the n-1 most likely sum to
    less than p, the n most likely to at least p, with a running sum in float64 and a margin of 1e-5.
    (Over thousands of tiny probabilities, two float32 running sums can disagree by one token.)"""
    running = logits.double().softmax(-1).sort(descending=True).values.cumsum(0)
    if not 1 <= n <= len(running):
        return False
    before = running[n - 2].item() if n >= 2 else 0.0
    return before < p + 1e-5 and running[n - 1].item() >= p - 1e-5


def check_nucleus_size(nucleus_size, llm) -> None:
    """`nucleus_size(probs, p)`: how many tokens top-p keeps from the probabilities `probs` (vocab,)."""
    all_logits = _next_token_logits(llm)
    if unanswered(nucleus_size(all_logits[0].softmax(-1), 0.9), "nucleus_size"):
        return
    # Equal logits give probabilities of exactly 1/4: the running sum lands exactly on p = 0.5.
    exact = torch.tensor([1.0, 1.0, 1.0, 1.0])
    got = nucleus_size(exact.softmax(-1), 0.5)
    assert got == 2, (
        f"four tokens of probability 1/4 each with p = 0.5 should keep 2 (the sum reaches p exactly "
        f"after two), you keep {got}: stop as soon as the running sum is >= p")
    for prompt, logits in zip(PROMPTS, all_logits):
        for p in (0.5, 0.9, 0.99):
            expected = _n_kept(top_p_filter(logits, p))
            got = nucleus_size(logits.softmax(-1), p)
            assert got == expected or _reaches_p_within_rounding(logits, p, int(got)), (
                f"after {prompt!r} with p = {p}, top-p keeps {expected} tokens, you say {got}: sort the "
                f"probabilities from largest to smallest, then count how many it takes for the running "
                f"sum to reach p (the token that crosses p is kept)")
    print(f"Correct: the nucleus sizes match llmlab's top_p_filter on {len(PROMPTS)} real distributions.")


def check_min_p_cutoff(min_p_cutoff, llm) -> None:
    """`min_p_cutoff(logits, min_p)`: the logit value c such that min-p keeps exactly the tokens with
    z_i >= c."""
    all_logits = _next_token_logits(llm)
    if unanswered(min_p_cutoff(all_logits[0], 0.1), "min_p_cutoff"):
        return
    for prompt, logits in zip(PROMPTS, all_logits):
        for min_p in (0.01, 0.1, 0.5):
            cutoff = float(min_p_cutoff(logits, min_p))
            kept = min_p_filter(logits, min_p) > -math.inf
            yours = logits >= cutoff
            # float32 may decide a token within rounding distance of the cut-off either way
            disputed = (kept != yours) & ((logits - cutoff).abs() > 1e-4)
            assert not disputed.any(), (
                f"after {prompt!r} with min_p = {min_p}, min-p keeps {int(kept.sum())} tokens but "
                f"logits >= {cutoff:.3f} keeps {int(yours.sum())}: write p_i >= min_p * p_max with "
                f"p_i = e^(z_i) / sum_j e^(z_j) and take the log of both sides")
    print("Correct: z_i >= z_max + ln(min_p) keeps exactly min-p's tokens; the normaliser cancels.")
