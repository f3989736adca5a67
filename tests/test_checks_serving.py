"""The checks of notebook 13 accept right answers and refuse wrong ones with a message that says what is wrong."""

import re

import pytest
import torch

from llmlab.checks import CheckFailed
from llmlab.checks.serving import (blocks_for_prompt, check_acceptance_rule, check_padding_waste,
                                   check_prompt_blocks)

LENGTHS = [12, 6, 16, 4, 10, 8, 14, 5]


# --- right answers, written independently of the checks ------------------------------------------

def padding_waste(lengths, batch_size):
    slots = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start:start + batch_size]
        slots += len(batch) * max(batch)
    return 1 - sum(lengths) / slots


def shared_blocks(prompt, computed, block_size):
    """The most whole leading blocks the prompt shares with any computed sequence."""
    hit_blocks = 0
    for tokens in computed:
        n = 0
        while (n + 1) * block_size <= min(len(prompt), len(tokens)) and \
                prompt[:(n + 1) * block_size] == tokens[:(n + 1) * block_size]:
            n += 1
        hit_blocks = max(hit_blocks, n)
    return hit_blocks


def blocks_for(prompt, computed, block_size):
    hit_blocks = min(shared_blocks(prompt, computed, block_size), (len(prompt) - 1) // block_size)
    return hit_blocks * block_size, -(-len(prompt) // block_size) - hit_blocks


def accept_probability(p, q, x):
    return min(1.0, (p[x] / q[x]).item())


def residual_distribution(p, q):
    excess = (p - q).clamp(min=0)
    return excess / excess.sum()


# --- wrong answers, each a typical mistake ---------------------------------------------------------

def waste_against_the_longest_of_all(lengths, batch_size):
    return 1 - sum(lengths) / (len(lengths) * max(lengths))


def waste_with_full_last_batch(lengths, batch_size):
    slots = sum(batch_size * max(lengths[i:i + batch_size]) for i in range(0, len(lengths), batch_size))
    return 1 - sum(lengths) / slots


def blocks_unchained(prompt, computed, block_size):
    full = (len(prompt) - 1) // block_size
    hits = sum(any(t[i * block_size:(i + 1) * block_size] == prompt[i * block_size:(i + 1) * block_size]
                   for t in computed) for i in range(full))
    return hits * block_size, -(-len(prompt) // block_size) - hits


def blocks_whole_last_block(prompt, computed, block_size):
    hit_blocks = shared_blocks(prompt, computed, block_size)
    return hit_blocks * block_size, -(-len(prompt) // block_size) - hit_blocks


def blocks_rounded_down(prompt, computed, block_size):
    hit, _ = blocks_for(prompt, computed, block_size)
    return hit, len(prompt) // block_size - hit // block_size


def blocks_partial_hits(prompt, computed, block_size):
    best = 0
    for tokens in computed:
        n = 0
        while n < min(len(prompt) - 1, len(tokens)) and prompt[n] == tokens[n]:
            n += 1
        best = max(best, n)
    return best, -(-(len(prompt) - best) // block_size)


# --- the tests ---------------------------------------------------------------------------------------

def test_right_answers_pass(capsys):
    check_padding_waste(padding_waste, LENGTHS)
    check_prompt_blocks(blocks_for)
    check_acceptance_rule(accept_probability, residual_distribution)
    real = (torch.softmax(torch.randn(49152), 0), torch.softmax(2 * torch.randn(49152), 0))
    check_acceptance_rule(accept_probability, residual_distribution, real)
    assert capsys.readouterr().out.count("Correct") == 4


def test_placeholders_say_what_to_fill_in(capsys):
    check_padding_waste(lambda lengths, batch_size: None)
    check_prompt_blocks(lambda prompt, computed, block_size: None)
    check_acceptance_rule(lambda p, q, x: None, lambda p, q: None)
    out = capsys.readouterr().out
    for name in ("padding_waste", "blocks_for", "accept_probability", "residual_distribution"):
        assert f"Fill in {name} above" in out


@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_the_checks_own_block_count_is_the_block_managers(block_size):
    """check_prompt_blocks raises RuntimeError when its answer and the BlockManager's differ: never here."""
    check_prompt_blocks(blocks_for, block_size=block_size)


def test_blocks_for_prompt_counts_a_chain_of_whole_blocks():
    text = list(range(100, 200))
    assert blocks_for_prompt(text[:40], [text[:40]], 16) == (32, 1)     # 40 tokens: 2 full blocks hit, 1 new
    assert blocks_for_prompt(text[:32], [text[:32]], 16) == (16, 1)     # the last block is always computed
    assert blocks_for_prompt([0] + text[1:40], [text[:40]], 16) == (0, 3)    # the first block differs: no hit


@pytest.mark.parametrize("wrong, message", [
    (waste_against_the_longest_of_all, "longest of them all"),
    (waste_with_full_last_batch, "the last batch holds only"),
    (lambda lengths, b: padding_waste(sorted(lengths), b), "sorted the requests"),
    (lambda lengths, b: 1 - padding_waste(lengths, b), "useful fraction"),
    (lambda lengths, b: round(padding_waste(lengths, b) * sum(lengths) / (1 - padding_waste(lengths, b))),
     "number of padded slots"),
    (lambda lengths, b: [padding_waste(lengths, b)], "return one number"),
])
def test_wrong_padding_waste_is_explained(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        check_padding_waste(wrong, LENGTHS)


@pytest.mark.parametrize("wrong, message", [
    (blocks_unchained, "its parent's key"),
    (blocks_whole_last_block, "counted the last block as a hit"),
    (blocks_rounded_down, "rounded the block count down"),
    (blocks_partial_hits, "not a whole number of blocks"),
    (lambda prompt, computed, bs: (blocks_for(prompt, computed, bs)[0] // bs, blocks_for(prompt, computed, bs)[1]),
     "counts tokens, not blocks"),
    (lambda prompt, computed, bs: (blocks_for(prompt, computed, bs)[0], -(-len(prompt) // bs)), "shared, not new"),
    (lambda prompt, computed, bs: blocks_for(prompt, computed, bs)[0], "return two numbers"),
])
def test_wrong_block_counts_are_explained(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        check_prompt_blocks(wrong)


@pytest.mark.parametrize("accept, residual, message", [
    (lambda p, q, x: (p[x] / q[x]).item(), residual_distribution, "above 1"),
    (lambda p, q, x: min(1.0, (q[x] / p[x]).item()), residual_distribution, "divided q(x) by p(x)"),
    (lambda p, q, x: p[x].item(), residual_distribution, "p(x) alone"),
    (accept_probability, lambda p, q: p - q, "negative entries"),
    (accept_probability, lambda p, q: (p - q).clamp(min=0), "normalise it"),
    (accept_probability, lambda p, q: residual_distribution(q, p), "max(0, q - p)"),
    (accept_probability, lambda p, q: p.clone(), "resampling from p"),
    (accept_probability, lambda p, q: residual_distribution(p, q)[:-1], "one probability per token"),
])
def test_wrong_acceptance_rules_are_explained(accept, residual, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        check_acceptance_rule(accept, residual)
