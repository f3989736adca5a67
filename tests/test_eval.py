"""llmlab.eval against independent computations: cross-entropy on Hugging Face's logits, and small
distributions worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import LlmlabError
from llmlab.eval import kl_divergence, perplexity, perplexity_from_logits, token_log_probs, top1_agreement


@torch.inference_mode()
def test_perplexity_matches_cross_entropy_on_hugging_face_logits(llm, hf_model, shakespeare_text):
    ids = llm.tokenizer.encode(shakespeare_text[8000:10000])[:200]
    reference_logits = hf_model(torch.tensor([ids])).logits[0]
    reference = F.cross_entropy(reference_logits[:-1], torch.tensor(ids[1:])).exp().item()
    ours = perplexity(llm, ids)
    assert ours == pytest.approx(reference, rel=1e-5)
    assert 1 < ours < 1000  # real English under a real model: far from uniform (49152)


def test_text_and_its_ids_give_the_same_perplexity(llm):
    text = "To be, or not to be, that is the question."
    assert perplexity(llm, text) == perplexity(llm, llm.tokenizer.encode(text))


@pytest.mark.parametrize("vocab", [2, 7, 49152])
def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size(vocab):
    ids = [0, 1, 1, 0, 1]
    assert perplexity_from_logits(torch.zeros(len(ids), vocab), ids) == pytest.approx(vocab, rel=1e-6)


def test_perplexity_by_hand_on_two_tokens():
    # Row 0 predicts token 1 with probability e^2 / (e^2 + e^0); row 1 is never used.
    logits = torch.tensor([[0.0, 2.0], [5.0, -5.0]])
    p = math.exp(2) / (math.exp(2) + 1)
    assert perplexity_from_logits(logits, [0, 1]) == pytest.approx(1 / p, rel=1e-6)
    assert token_log_probs(logits, [0, 1]).tolist() == pytest.approx([math.log(p)], rel=1e-6)


@pytest.mark.bad_input(kind='perplexity of fewer than two tokens', gets='LlmlabError: nothing to predict')
@pytest.mark.parametrize("too_short", [[], [5], "", torch.tensor([3])])
def test_fewer_than_two_tokens_is_an_error(llm, too_short):
    with pytest.raises(LlmlabError, match="at least 2 tokens"):
        perplexity(llm, too_short)


@pytest.mark.bad_input(kind='logits that do not match the token ids', gets='LlmlabError with both shapes')
def test_logits_that_do_not_match_the_ids_are_an_error():
    with pytest.raises(LlmlabError, match="do not match"):
        perplexity_from_logits(torch.zeros(4, 10), [1, 2, 3])
    with pytest.raises(LlmlabError, match="at least 2 tokens"):
        token_log_probs(torch.zeros(1, 10), [1])


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(0)) * 5
    assert kl_divergence(logits, logits) == 0.0
    assert kl_divergence(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax ignores shifts


def test_kl_against_a_hand_computed_example():
    # P = (1/2, 1/2), Q = (9/10, 1/10): KL = 1/2 ln(5/9) + 1/2 ln(5)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p.log(), q.log()) == pytest.approx(expected, rel=1e-6)
    # the other direction is a different number: KL is not symmetric
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_divergence(q.log(), p.log()) == pytest.approx(reverse, rel=1e-6)


def test_kl_averages_over_positions_and_ignores_impossible_reference_tokens():
    reference = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 0.0, -math.inf], [math.log(2), 0.0, 0.0]])
    # row 0: identical, P_3 = Q_3 = 0 -> 0 (not nan). row 1: P uniform, Q = (1/2, 1/4, 1/4).
    row1 = sum(1 / 3 * math.log((1 / 3) / q) for q in (0.5, 0.25, 0.25))
    assert kl_divergence(reference, other) == pytest.approx(row1 / 2, rel=1e-6)  # log 2 rounded to float32


def test_top1_agreement_on_known_tensors():
    reference = torch.tensor([[1.0, 5.0, 2.0], [0.0, 0.0, 9.0], [3.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    other = torch.tensor([[1.0, 6.0, 2.0], [9.0, 0.0, 1.0], [3.0, 2.0, 1.0], [2.0, 2.0, 1.0]])
    # argmax: [1, 2, 0, 0] vs [1, 0, 0, 0] (ties go to the lowest id in both)
    assert top1_agreement(reference, other) == 0.75
    assert top1_agreement(reference, reference) == 1.0
    assert top1_agreement(reference[1], other[1]) == 0.0  # a single (vocab,) row works too


@pytest.mark.bad_input(kind='logits of different shapes to compare', gets='LlmlabError with both shapes')
def test_comparing_logits_of_different_shapes_is_an_error():
    with pytest.raises(LlmlabError, match="same shape"):
        kl_divergence(torch.zeros(3, 5), torch.zeros(3, 6))
    with pytest.raises(LlmlabError, match="same shape"):
        top1_agreement(torch.zeros(2, 5), torch.zeros(5))


@torch.inference_mode()
def test_long_text_in_windows_matches_cross_entropy_window_by_window(llm, hf_model, shakespeare_text):
    ids = llm.tokenizer.encode(shakespeare_text[20000:22000])[:120]
    window = 50
    # windows share one token: [0, 50), [49, 99), [98, 120); each predicts all but its first token
    nll, count = 0.0, 0
    for start in (0, 49, 98):
        chunk = torch.tensor(ids[start:start + window])
        logits = hf_model(chunk[None]).logits[0]
        nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    assert count == len(ids) - 1  # every token after the first, once
    assert perplexity(llm, ids, window=window) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(llm, ids, window=len(ids)) == pytest.approx(perplexity(llm, ids), rel=1e-12)


@pytest.mark.parametrize("window", [1, 0, 2.5, None])
def test_a_window_too_small_to_predict_anything_is_an_error(llm, window):
    with pytest.raises(LlmlabError, match="window"):
        perplexity(llm, [1, 2, 3], window=window)
