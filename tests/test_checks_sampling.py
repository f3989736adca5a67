"""The checks of notebook 05 accept right answers and refuse wrong ones with a message that says what is wrong."""

import math

import pytest
import torch

from llmlab.checks import CheckFailed
from llmlab.checks.sampling import check_min_p_cutoff, check_nucleus_size, check_sampler


# --- right answers, written independently of the checks ------------------------------------------

def nucleus_size(probs, p):
    running = probs.sort(descending=True).values.cumsum(dim=0)
    return min(int((running < p).sum()) + 1, len(probs))


def min_p_cutoff(logits, min_p):
    return logits.max() + math.log(min_p)


def keep_top_k(z, k):
    kept = z.topk(k).indices
    return torch.full_like(z, -math.inf).scatter(0, kept, z[kept])


def nucleus(z, p, keep_crossing=True):
    probs, order = z.softmax(dim=-1).sort(descending=True)
    reached = probs.cumsum(dim=0) >= p
    drop = torch.cat([torch.tensor([False]), reached[:-1]]) if keep_crossing else reached
    return z.index_fill(0, order[drop], -math.inf)


def sampler_probs(logits, temperature, top_k=None, top_p=None):
    z = logits / temperature
    if top_k is not None:
        z = keep_top_k(z, top_k)
    if top_p is not None:
        z = nucleus(z, top_p)
    return z.softmax(dim=-1)


# --- typical wrong answers -------------------------------------------------------------------------

def top_p_before_temperature(logits, temperature, top_k=None, top_p=None):
    z = nucleus(logits, top_p) if top_p is not None else logits
    z = z / temperature
    return (keep_top_k(z, top_k) if top_k is not None else z).softmax(dim=-1)


def crossing_token_dropped(logits, temperature, top_k=None, top_p=None):
    z = logits / temperature
    if top_k is not None:
        z = keep_top_k(z, top_k)
    return (nucleus(z, top_p, keep_crossing=False) if top_p is not None else z).softmax(dim=-1)


def top_p_ignores_top_k(logits, temperature, top_k=None, top_p=None):
    z = logits / temperature
    if top_p is not None:
        z = nucleus(z, top_p)
    return (keep_top_k(z, top_k) if top_k is not None else z).softmax(dim=-1)


def not_renormalised(logits, temperature, top_k=None, top_p=None):
    kept = sampler_probs(logits, temperature, top_k, top_p) > 0
    return torch.where(kept, (logits / temperature).softmax(dim=-1), 0.0)


def no_temperature(logits, temperature, top_k=None, top_p=None):
    return sampler_probs(logits, 1.0, top_k, top_p)


def one_too_many(logits, temperature, top_k=None, top_p=None):
    return sampler_probs(logits, temperature, top_k + 1 if top_k else None, top_p)


def test_right_answers_pass(llm, capsys):
    check_nucleus_size(nucleus_size, llm)
    check_min_p_cutoff(min_p_cutoff, llm)
    check_sampler(sampler_probs, llm)
    assert capsys.readouterr().out.count("Correct") == 3


def test_placeholders_ask_for_an_answer(llm, capsys):
    check_sampler(lambda *args: None, llm)
    assert "Fill in sampler_probs" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, advice", [
    (top_p_before_temperature, "top-p computed before the temperature"),
    (crossing_token_dropped, "without the token whose probability crosses p"),
    (top_p_ignores_top_k, "top-p over the whole vocabulary, ignoring top-k"),
    (not_renormalised, "renormalise the tokens you keep"),
    (no_temperature, "divide the logits by T"),
    (one_too_many, "llmlab keeps 50 tokens, you keep 51"),
    (lambda logits, *args: logits.softmax(-1)[:100], "one per token of the vocabulary"),
])
def test_wrong_samplers_are_refused_with_advice(llm, wrong, advice):
    with pytest.raises(CheckFailed, match="with T = ") as failure:
        check_sampler(wrong, llm)
    assert advice in str(failure.value)


def test_wrong_nucleus_and_cutoff_are_refused(llm):
    with pytest.raises(CheckFailed, match="stop as soon as the running sum is >= p"):
        check_nucleus_size(lambda probs, p: int((probs.sort(descending=True).values.cumsum(0) <= p).sum()) + 1, llm)
    with pytest.raises(CheckFailed, match="take the log of both sides"):
        check_min_p_cutoff(lambda logits, min_p: logits.max() * min_p, llm)
