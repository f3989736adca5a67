"""The checks of notebook 01 accept right answers and refuse wrong ones with a message that says what is wrong."""

import pytest

from llmlab.checks import CheckFailed
from llmlab.checks.tokenization import check_bpe_encode, check_chat_ids, check_utf8_encode
from llmlab.gguf import read_metadata
from llmlab.llm import bundled_model_path
from llmlab.tokenizer import Tokenizer, bytes_to_unicode

QUESTION = [{"role": "user", "content": "Who wrote Hamlet?"}]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf_metadata(read_metadata(bundled_model_path()))


# --- right answers, written independently of the checks ------------------------------------------

def utf8_encode(c):
    if c < 0x80:
        return bytes([c])
    n = 2 if c < 0x800 else 3 if c < 0x10000 else 4
    first = ((0xFF00 >> n) & 0xFF) | (c >> 6 * (n - 1))
    return bytes([first] + [0x80 | (c >> 6 * k) & 0x3F for k in range(n - 2, -1, -1)])


def bpe_encode(word, ranks):
    parts = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    while True:
        pairs = [(ranks[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in ranks]
        if not pairs:
            return parts
        best = parts[min(pairs)[1]], parts[min(pairs)[1] + 1]
        out, i = [], 0
        while i < len(parts):
            if tuple(parts[i:i + 2]) == best:
                out.append(best[0] + best[1]); i += 2
            else:
                out.append(parts[i]); i += 1
        parts = out


def chat_ids(tok, system=SYSTEM, newline="\n"):
    turn = lambda role, text: [tok.bos_id] + tok.encode(f"{role}\n{text}") + [tok.eos_id] + tok.encode(newline)
    return turn("system", system) + turn("user", QUESTION[0]["content"]) + [tok.bos_id] + tok.encode("assistant\n")


def test_right_answers_pass(tok, capsys):
    check_utf8_encode(utf8_encode)
    check_bpe_encode(bpe_encode, tok)
    check_chat_ids(chat_ids(tok), QUESTION, tok)
    assert capsys.readouterr().out.count("Correct") == 3


def test_placeholders_say_what_to_fill_in(tok, capsys):
    check_utf8_encode(None)
    check_bpe_encode(None, tok)
    check_chat_ids(None, QUESTION, tok)
    out = capsys.readouterr().out
    assert all(f"Fill in {name}" in out for name in ("utf8_encode", "bpe_encode", "chat_ids"))


# --- typical mistakes ----------------------------------------------------------------------------

def utf8_no_four_bytes(c):
    return utf8_encode(min(c, 0xFFFF)) if c < 0x10000 else utf8_encode(c)[:3]


def utf8_continuation_without_marker(c):
    out = utf8_encode(c)
    return out[:1] + bytes(b & 0x3F for b in out[1:])


def bpe_leftmost_longest(word, ranks):           # joins the first mergeable pair from the left, not the lowest rank
    parts = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    changed = True
    while changed:
        changed = False
        for i, pair in enumerate(zip(parts, parts[1:])):
            if pair in ranks:
                parts[i:i + 2] = [pair[0] + pair[1]]
                changed = True
                break
    return parts


def bpe_without_byte_spelling(word, ranks):      # forgets bytes_to_unicode: a space stays " ", not "Ġ"
    return bpe_encode(word, ranks) if " " not in word else list(word)


@pytest.mark.parametrize("wrong, message", [
    (utf8_no_four_bytes, "takes 4 byte"),
    (utf8_continuation_without_marker, "each following byte is 10xxxxxx"),
    (lambda c: [c], "returned list: return bytes"),
])
def test_wrong_utf8_is_explained(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_utf8_encode(wrong)


@pytest.mark.parametrize("wrong", [bpe_leftmost_longest, bpe_without_byte_spelling])
def test_wrong_bpe_is_located(tok, wrong):
    with pytest.raises(CheckFailed, match="LOWEST rank"):
        check_bpe_encode(wrong, tok)


@pytest.mark.parametrize("kwargs, position", [({"system": "You are helpful."}, 5), ({"newline": ""}, 20)])
def test_wrong_chat_ids_are_located(tok, kwargs, position):
    with pytest.raises(CheckFailed, match=f"differ from the chat template's at position {position}"):
        check_chat_ids(chat_ids(tok, **kwargs), QUESTION, tok)
