"""Checks for the exercises of notebooks/05_decoding_and_sampling.ipynb.

Expected answers come from llmlab's filters (`top_p_filter`, `min_p_filter`, `sampling_probs`,
themselves tested against brute-force references in tests/test_sampling.py) applied to the live
model's next-token distributions, never from a stored number.
"""

from __future__ import annotations

import math

import torch

from llmlab.sampling import SamplingParams, apply_temperature, min_p_filter, sampling_probs, top_k_filter, top_p_filter

from . import check, unanswered

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


@check
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


@check
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


# (temperature, top_k, top_p): each filter alone, then together, at temperatures that change top-p's nucleus
SAMPLER_SETTINGS = [(1.0, None, None), (0.7, 50, None), (1.0, None, 0.9), (0.6, None, 0.95),
                    (1.3, 40, 0.8), (1.0, 5, 0.5)]
# A right sampler differs from llmlab's only by float32 rounding: z / T rounded a little differently
# (llmlab subtracts the largest logit first) moves exp(z / T) by a few 1e-6 relative, and softmax sums
# 49,152 terms in another order. 1e-4 is far above that and far below any real mistake (a missing
# renormalisation or a filter applied in the wrong order moves probabilities by percents).
SAMPLER_RTOL, SAMPLER_ATOL = 1e-4, 1e-12


def _setting(temperature, top_k, top_p) -> str:
    return f"T = {temperature}, top_k = {top_k}, top_p = {top_p}"


def _near_nucleus_edge(logits: torch.Tensor, temperature, top_k, top_p, token: int) -> bool:
    """True if top-p's decision on `token` is within float32 rounding: the float64 running sum of the
    (temperature-scaled, top-k-renormalised) probabilities ranked above it is within 1e-5 of p."""
    if top_p is None:
        return False
    z = apply_temperature(logits.double(), temperature)
    if top_k is not None:
        z = top_k_filter(z, top_k)
    probs = z.softmax(-1)
    above = probs[probs > probs[token]].sum().item()
    return abs(above - top_p) < 1e-5


def _usual_mistakes(logits, temperature, top_k, top_p) -> dict[str, torch.Tensor]:
    """The kept sets (bool, vocab) of the usual ways to get top-p wrong, built from llmlab's filters."""
    if top_p is None:
        return {}
    z = apply_temperature(logits, temperature)
    if top_k is not None:
        z = top_k_filter(z, top_k)
    probs, order = z.softmax(-1).sort(descending=True)
    below_p = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, probs.cumsum(0) < top_p)
    mistakes = {"top-p computed before the temperature (T changes which tokens reach p: divide by T first)":
                top_p_filter(logits, top_p) > -math.inf,
                "a nucleus without the token whose probability crosses p (keep it: the nucleus is the "
                "smallest set that reaches p)": below_p}
    if top_k is not None:
        mistakes["top-p over the whole vocabulary, ignoring top-k (after top-k, the k kept tokens are "
                 "renormalised and p is reached among them)"] = (
            top_k_filter(top_p_filter(apply_temperature(logits, temperature), top_p), top_k) > -math.inf)
    return mistakes


@check
def check_sampler(sampler_probs, llm) -> None:
    """`sampler_probs(logits, temperature, top_k, top_p)`: logits, a float32 tensor (vocab,); temperature a
    float > 0; top_k an int or None; top_p a float in (0, 1] or None -> the distribution a token is drawn
    from, a float32 tensor (vocab,) summing to 1, 0 for every token removed. Compared with llmlab's
    `sampling_probs` on the live model's next-token logits, setting by setting."""
    all_logits = _next_token_logits(llm)
    if unanswered(sampler_probs(all_logits[0].clone(), 1.0, None, None), "sampler_probs"):
        return
    tok = llm.tokenizer
    for prompt, logits in zip(PROMPTS, all_logits):
        for temperature, top_k, top_p in SAMPLER_SETTINGS:
            where = f"after {prompt!r} with {_setting(temperature, top_k, top_p)}"
            expected = sampling_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
            got = sampler_probs(logits.clone(), temperature, top_k, top_p)
            assert isinstance(got, torch.Tensor) and got.shape == expected.shape, (
                f"{where}: return a tensor of {len(expected):,} probabilities, one per token of the vocabulary, "
                f"got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
            got = got.float()
            assert torch.isfinite(got).all() and (got >= 0).all(), (
                f"{where}: probabilities must be finite and >= 0: a removed token gets probability 0 "
                f"(logit -inf before the softmax)")
            total = got.double().sum().item()
            assert abs(total - 1) < 1e-4, (
                f"{where}: your probabilities sum to {total:.4f}: renormalise the tokens you keep "
                f"(a softmax over the filtered logits does it)")
            differ = torch.nonzero((got > 0) != (expected > 0)).flatten().tolist()
            if differ and all(_near_nucleus_edge(logits, temperature, top_k, top_p, t) for t in differ):
                continue        # top-p's cut within float32 rounding of p: either answer is right
            if differ:
                yours = got > 0
                for mistake, kept in _usual_mistakes(logits, temperature, top_k, top_p).items():
                    assert not torch.equal(yours, kept), f"{where}: you keep exactly the tokens of {mistake}."
                token = differ[0]
                who = "llmlab keeps it, you drop it" if expected[token] > 0 else "you keep it, llmlab drops it"
                rank = int((logits > logits[token]).sum()) + 1
                raise AssertionError(
                    f"{where}: llmlab keeps {int((expected > 0).sum()):,} tokens, you keep {int(yours.sum()):,}. "
                    f"First difference: token {token} {tok.decode([token])!r} (rank {rank} by logit): {who}.")
            close = torch.isclose(got, expected, rtol=SAMPLER_RTOL, atol=SAMPLER_ATOL)
            if not close.all():
                token = int(torch.nonzero(~close)[0])
                raise AssertionError(
                    f"{where}: you keep the right tokens, but token {token} {tok.decode([token])!r} has "
                    f"probability {got[token]:.6g} in yours, {expected[token]:.6g} in llmlab's: divide the "
                    f"logits by T, filter, then one softmax over what is left")
    print(f"Correct: the same distribution as llmlab's sampling_probs in {len(SAMPLER_SETTINGS)} settings "
          f"on {len(PROMPTS)} real next-token distributions.")
