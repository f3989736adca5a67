"""Checks for the exercises of notebooks/01_tokenization.ipynb.

Every expected answer is computed here, from Python's own UTF-8 codec or from llmlab's tokenizer.
"""

from __future__ import annotations

from llmlab.tokenizer import Tokenizer, bytes_to_unicode, train_bpe

from . import check, unanswered

# The edges of UTF-8's four lengths (1 byte up to U+007F, 2 up to U+07FF, 3 up to U+FFFF, else 4),
# and characters readers meet: "A", "é", "€", "世", "😀".
EDGES = [0x00, 0x41, 0x7F, 0x80, 0xE9, 0x7FF, 0x800, 0x20AC, 0x4E16, 0xFFFF, 0x10000, 0x1F600, 0x10FFFF]
SURROGATES = range(0xD800, 0xE000)   # reserved for UTF-16: UTF-8 has no encoding for them

# Words (as `pre_tokenize` gives them) whose merges happen in an order that differs from their spelling.
WORDS = ["Hello", " the", " tokenization", " Shakespeare", " unbelievable", " thee", "aaaaaaa",
         " héllo", "!!!", " 世界", " 🤗"]


def _bits(data: bytes) -> str:
    return " ".join(f"{b:08b}" for b in data)


@check
def check_utf8_encode(utf8_encode) -> None:
    """`utf8_encode(code_point) -> bytes` against Python's codec, on every length of UTF-8."""
    if unanswered(utf8_encode, "utf8_encode"):
        return
    code_points = EDGES + [c for c in range(0, 0x110000, 1009) if c not in SURROGATES]
    for c in code_points:
        expected, got = chr(c).encode("utf-8"), utf8_encode(c)
        assert isinstance(got, bytes), f"utf8_encode({c:#x}) returned {type(got).__name__}: return bytes([...])"
        assert len(got) == len(expected), (
            f"U+{c:04X} takes {len(expected)} byte(s) in UTF-8, you gave {len(got)}: the length changes "
            f"after U+007F, U+07FF and U+FFFF")
        assert got == expected, (
            f"U+{c:04X} = {c:021b} in bits\n  expected {_bits(expected)}\n  you gave {_bits(got)}\n"
            f"The first byte starts with as many 1s as there are bytes (none, just 0, for one byte), then a 0; "
            f"each following byte is 10xxxxxx; the code point's bits fill the x's, most significant first.")
    print(f"Correct: your encoder agrees with Python's UTF-8 codec on {len(code_points):,} code points, "
          f"from 1 to 4 bytes.")


@check
def check_bpe_encode(bpe_encode, tokenizer: Tokenizer) -> None:
    """`bpe_encode(word, ranks) -> list of tokens` against `Tokenizer.bpe`, on `tokenizer` and on a
    tiny vocabulary trained here where the longest match from the left gives the wrong answer."""
    if unanswered(bpe_encode, "bpe_encode"):
        return
    spell = bytes_to_unicode()
    tiny = train_bpe("bc\nbc\nbc\nbc\nab\nab", 300).tokenizer()   # merges "b c", then "a b"
    cases = [(tokenizer, w) for w in WORDS] + [(tiny, w) for w in ("abc", "abcbc", "aabc", "abab")]
    for tok, word in cases:
        expected = tok.bpe("".join(spell[b] for b in word.encode("utf-8")))
        got = bpe_encode(word, tok.merge_ranks)
        assert got == expected, (
            f"{word!r} with {'SmolLM2' if tok is tokenizer else 'the tiny vocabulary'}: expected {expected}, "
            f"you gave {got}.\nSpell the word's UTF-8 bytes with bytes_to_unicode(), then repeat: find the "
            f"adjacent pair with the LOWEST rank anywhere in the word, join every occurrence of it, until "
            f"no adjacent pair has a rank.")
    print(f"Correct: your encoder gives the same tokens as llmlab's on {len(cases)} words, "
          f"for SmolLM2's 48,900 merges and for a tiny vocabulary.")


@check
def check_chat_ids(ids, messages: list[dict], tokenizer: Tokenizer) -> None:
    """Ids built by hand for a conversation against `tokenizer.encode_chat` (the chat template)."""
    if unanswered(ids, "chat_ids"):
        return
    expected = tokenizer.encode_chat(messages, add_generation_prompt=True)
    ids = list(ids)
    if ids != expected:
        at = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
        shown = lambda xs: [(i, tokenizer.decode([i])) for i in xs[max(0, at - 2):at + 3]]
        hint = ("control tokens such as <|im_start|> are one id each (tokenizer.bos_id, tokenizer.eos_id), "
                "the text between them is encoded as usual, and every message ends with <|im_end|> and a "
                "newline; the prompt ends with '<|im_start|>assistant\\n'")
        raise AssertionError(f"your ids differ from the chat template's at position {at}:\n"
                             f"  expected ... {shown(expected)}\n  you gave ... {shown(ids)}\nHint: {hint}")
    print(f"Correct: your {len(ids)} ids are exactly what the chat template gives.")
