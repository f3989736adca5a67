"""Checks at the boundary: a value from the user becomes what the engine needs, or an LlmlabError that
says what was wrong and how to fix it.

Types are strict where a loose one would give a made-up result: True is not the integer 1, 2.0 is
not a token id, and the string "123" is not the ids [1, 2, 3].
"""

from __future__ import annotations

import numbers

import regex

from .errors import LlmlabError

LONE_SURROGATE = regex.compile("[\ud800-\udfff]")


def is_int(x) -> bool:
    """An integer (NumPy's included), and not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def positive_int(value, name: str) -> int:
    if not is_int(value) or value < 1:
        raise LlmlabError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise LlmlabError(f"{name} must be True or False, got {value!r}")
    return value


def text(value, what: str = "the text") -> str:
    """`value` if it is a str that can be written as UTF-8.

    A lone surrogate (U+D800..U+DFFF) is not a character: it is what Python makes of bytes that are not
    valid UTF-8 in a command-line argument or a file read with errors="surrogateescape", and encoding it
    fails deep inside the tokenizer.
    """
    if not isinstance(value, str):
        raise LlmlabError(f"{what} must be text (a str), got {type(value).__name__} {_short(value)}")
    bad = LONE_SURROGATE.search(value)
    if bad:
        raise LlmlabError(f"{what} holds U+{ord(bad[0]):04X} at character {bad.start()}: a lone surrogate, the "
                          f"stand-in Python uses for bytes that are not valid UTF-8. Give the text in UTF-8.")
    return value


def token_ids(ids, vocab_size: int | None, what: str = "token ids", allow_empty: bool = False) -> list[int]:
    """`ids` (a list, tuple, 1-D tensor or array of integers) as a list of ints in 0..vocab_size-1
    (any ints, for vocab_size None)."""
    if isinstance(ids, (str, bytes, bytearray)):
        raise LlmlabError(f"{what} must be a list of integers, got {type(ids).__name__} {_short(ids)}: "
                          f"encode text with llm.tokenizer.encode(text) first")
    if hasattr(ids, "tolist"):            # a tensor or array: its items become Python numbers (or lists, if 2-D)
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError:
        raise LlmlabError(f"{what} must be a list of integers, got {type(ids).__name__} {_short(ids)}") from None
    wrong = [i for i in ids if not is_int(i)]
    if wrong:
        raise LlmlabError(f"{what} must be integers, got {type(wrong[0]).__name__} {_short(wrong[0])} among them")
    if not ids and not allow_empty:
        raise LlmlabError("the prompt is empty: give at least one token")
    outside = next((i for i in ids if not 0 <= i < vocab_size), None) if vocab_size is not None else None
    if outside is not None:
        raise LlmlabError(f"token id {outside} is outside the vocabulary (0..{vocab_size - 1})")
    return [int(i) for i in ids]


def _short(value) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
