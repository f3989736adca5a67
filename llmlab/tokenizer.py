"""SmolLM2's tokenizer, written from scratch: byte-level BPE built from the GGUF file's vocabulary,
and `train_bpe`, which learns such a vocabulary from text.

Text becomes token ids in four steps, and each has a function here you can call on its own:

1. `split_special` cuts out control tokens written in the text ("<|im_start|>"), which map to one id each.
2. `pre_tokenize` cuts the rest into words. BPE never merges across these cuts, so "the cat" can
   never become one token. SmolLM2 first puts every digit on its own, then applies GPT-2's split.
3. Each word's UTF-8 bytes are spelled with `bytes_to_unicode()`, one printable character per byte,
   which is the alphabet the vocabulary is written in ("Ġthe" is " the").
4. `bpe` merges that spelling: repeatedly join the adjacent pair that was learned earliest (the
   lowest merge rank) until no learned pair is left. Each resulting piece is a token.

Decoding runs backwards: ids -> the bytes each token stands for -> one UTF-8 decode of all of them.

Training (`train_bpe`) learns the merges of step 4: start from the 256 bytes and repeatedly make the
most frequent adjacent pair of symbols a new token. Its result gives a `Tokenizer` with `.tokenizer()`.

Where Hugging Face differs: transformers (5.x) builds a tokenizer from this GGUF without knowing
`tokenizer.ggml.pre = "smollm"`, so it falls back to GPT-2's split and does not split digits first.
Because no merge in the vocabulary involves a digit, the digits themselves come out the same; what
changes is the whitespace in front of them. GPT-2's `\\s+(?!\\S)` leaves the last whitespace character of
a run for the next piece, whereas after the digit split the run ends at the cut and stays whole:
"x\\n\\n1" is ["x", "\\n", "\\n", "1"] -> [104, 198, 198, 33] for HF-from-GGUF but ["x", "\\n\\n", "1"] ->
[104, 1116, 33] here, as SmolLM2's own tokenizer.json and llama.cpp do it. tests/test_tokenizer.py
shows that every difference is of this kind. (One more, of no practical weight: the `regex` module
may carry newer Unicode tables than the Oniguruma inside `tokenizers`, so a letter Unicode assigned
only lately, such as U+A7CE, counts as a letter here and not there.)
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable

import regex  # the PyPI module: unlike `re`, it knows Unicode classes such as \p{L} and \p{N}

from . import validate
from .chat_template import check_messages, render_chat_template
from .errors import LlmlabError

NORMAL = 1         # llama.cpp's token type for an ordinary vocabulary entry
CONTROL = 3        # llama.cpp's token type for tokens like <|im_start|>: never produced by BPE
USER_DEFINED = 4   # added tokens that are not special (none in SmolLM2), also matched whole in text

# GPT-2's split: contractions, words with their leading space, numbers, punctuation runs, and
# whitespace. `\s+(?!\S)` takes a whitespace run except its last character when a word follows, so
# that the space stays attached to the word (" the") and a word is spelled the same wherever it is.
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
DIGIT = regex.compile(r"(\p{N})")  # the group keeps each digit in the split's output

# What llama.cpp calls each pre-tokenizer: only SmolLM2's is written here.
PRE_TOKENIZERS = ("smollm",)
NEVER = float("inf")  # the rank of a pair that has no merge
CACHED_WORD_CHARS = 64   # longer words (runs without a space) are rarely seen twice: not worth their memory
# Stand-ins for control-token text inside a chat message, while the template renders: Unicode's
# private-use plane 15, whose characters have no meaning anyone else relies on.
STAND_INS = regex.compile("[\U000F0000-\U000FFFFD]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each of the 256 byte values to a printable character.

    BPE vocabularies are stored as text, and some bytes (space, newline, control bytes, the halves of
    multi-byte characters) would be invisible or invalid there. Printable Latin-1 bytes keep their own
    character; every other byte is given the next free character from 256 on, so space (32) becomes
    'Ġ' (256 + 32) and newline (10) becomes 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def pre_tokenize(text: str) -> list[str]:
    """SmolLM2's split of text into words: every digit alone, then GPT-2's split on what is between."""
    words = []
    for i, part in enumerate(DIGIT.split(text)):
        if i % 2:        # odd parts are the digits the group captured
            words.append(part)
        elif part:
            words.extend(GPT2_SPLIT.findall(part))
    return words


class Tokenizer:
    """Byte-level BPE over a GGUF vocabulary: `encode` text to ids, `decode` ids to text."""

    def __init__(self, tokens: list[str], merges: list[str], token_types: list[int], *, bos_id: int | None,
                 eos_id: int | None, chat_template: str | None = None, pre: str = "smollm"):
        if pre not in PRE_TOKENIZERS:
            raise LlmlabError(f"unknown pre-tokenizer {pre!r}: this tokenizer implements {list(PRE_TOKENIZERS)}.")
        self.tokens = list(tokens)
        self.vocab_size = len(self.tokens)
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        # "Ġ t" -> ("Ġ", "t"): 0. A lower rank was learned earlier, from a more frequent pair, and wins.
        self.merge_ranks = {tuple(m.split(" ", 1)): rank for rank, m in enumerate(merges)}
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template
        self.pre = pre
        self.special_ids = {i for i, t in enumerate(token_types) if t == CONTROL}
        whole = [self.tokens[i] for i, t in enumerate(token_types) if t in (CONTROL, USER_DEFINED)]
        # Longest first, so a token that is a prefix of another cannot win the alternation.
        alternatives = "|".join(regex.escape(t) for t in sorted(whole, key=len, reverse=True))
        self.special_pattern = regex.compile(f"({alternatives})") if whole else None
        byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in byte_to_char.items()}
        # SmolLM2's vocabulary lacks 21 of the 256 bytes: six ASCII control characters (\x04 \x06 \x13
        # \x14 \x16 \x1d), the lead bytes 0xF1 0xF2 of U+40000..U+BFFFF (unassigned in Unicode) and 13
        # bytes that never occur in UTF-8. Hugging Face and llama.cpp silently drop such a byte before
        # merging, so we spell it as "" and do the same.
        self.byte_to_char = [c if c in self.token_to_id else "" for c in map(byte_to_char.get, range(256))]
        self.dropped_bytes = bytes(b for b in range(256) if not self.byte_to_char[b])
        # Each token stands for at most this many bytes, so a text of n (kept) bytes is at least
        # n / longest_token_bytes tokens: a bound that refuses a text too long for the context before
        # any time goes into encoding it. (81 for SmolLM2: a newline and 80 spaces.)
        self.longest_token_bytes = max(map(len, map(self.token_bytes, range(self.vocab_size))), default=1)
        # Text repeats its words; remembering each word's ids makes encoding mostly dict look-ups.
        self.word_cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise LlmlabError(f"tokenizer.ggml.model is {model!r}: llmlab only implements byte-level BPE ('gpt2').")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise LlmlabError(f"tokenizer.ggml.pre is {pre!r}: llmlab only implements the pre-tokenizer(s) "
                              f"{list(PRE_TOKENIZERS)}, and another split would give different ids.")
        missing = [k for k in ("tokens", "merges", "token_type", "bos_token_id", "eos_token_id")
                   if f"tokenizer.ggml.{k}" not in meta]
        if missing:
            raise LlmlabError(f"the GGUF metadata lacks tokenizer.ggml.{missing[0]}, "
                              f"so it does not describe a BPE tokenizer.")
        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], meta["tokenizer.ggml.token_type"],
                   bos_id=meta["tokenizer.ggml.bos_token_id"], eos_id=meta["tokenizer.ggml.eos_token_id"],
                   chat_template=meta.get("tokenizer.chat_template"), pre=pre)

    # --- encoding ------------------------------------------------------------------------------

    def bpe(self, word: str) -> list[str]:
        """Merge a word's byte spelling into tokens: always join the adjacent pair of lowest rank, the
        leftmost first among equal ones.

        Rescanning the word for the best pair after every merge would take n passes over a word of n
        characters: seconds for a 10,000-letter run without a space. Instead, as Hugging Face does, the
        candidate pairs wait in a heap ordered by (rank, position), and each merge pushes only the (at
        most two) pairs it creates with its neighbours: O(n log n).
        """
        parts: list[str | None] = list(word)            # a merged-away part becomes None
        following = [*range(1, len(parts)), -1]          # the next part still alive after each, or -1
        preceding = list(range(-1, len(parts) - 1))
        heap = [(rank, i, a, b) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                if (rank := self.merge_ranks.get((a, b))) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = following[i]
            if j < 0 or parts[i] != a or parts[j] != b:   # stale: a side was merged since this was pushed
                continue
            parts[i], parts[j] = a + b, None
            following[i] = following[j]
            if following[j] >= 0:
                preceding[following[j]] = i
            for left, right in ((preceding[i], i), (i, following[i])):
                if left >= 0 and right >= 0 and (rank := self.merge_ranks.get((parts[left], parts[right]))) is not None:
                    heapq.heappush(heap, (rank, left, parts[left], parts[right]))
        return [p for p in parts if p is not None]

    def encode_word(self, word: str) -> list[int]:
        """The ids of one pre-tokenized word."""
        ids = self.word_cache.get(word)
        if ids is None:
            spelled = "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
            ids = [self.token_to_id[piece] for piece in self.bpe(spelled)]
            if len(self.word_cache) > 200_000:   # bound the memory a long, varied text can take
                self.word_cache.clear()
            if len(word) <= CACHED_WORD_CHARS:
                self.word_cache[word] = ids
        return ids

    def split_special(self, text: str) -> list[str]:
        """Text cut around control tokens: odd-numbered parts are control tokens, even ones plain text."""
        return self.special_pattern.split(text) if self.special_pattern else [text]

    def encode(self, text: str, *, parse_special: bool = True, max_tokens: int | None = None) -> list[int]:
        """Token ids for `text`. Adds no BOS: SmolLM2's file says add_bos_token = False.

        Bytes the vocabulary has no token for are dropped (see `byte_to_char`), so decode(encode(s)) == s
        for every string except those holding such a byte.

        With parse_special, "<|im_start|>" written in the text becomes its one id, as a chat template
        needs. Without it, it is spelled out as ordinary text ("<", "|", "im", ...), which is what you
        want for text from users, so they cannot forge the structure of a conversation.

        max_tokens: raise TooManyTokens as soon as the text is known to be longer, by its length in bytes
        before any encoding, else as soon as the count passes it.
        """
        text = validate.text(text)
        return self.encode_parts(self.split_special(text) if parse_special else [text], max_tokens)

    def encode_parts(self, parts: list[str], max_tokens: int | None = None) -> list[int]:
        """Ids of text already cut by `split_special`: odd-numbered parts are control tokens."""
        limit = float("inf") if max_tokens is None else max_tokens
        if max_tokens is not None:
            n_bytes = sum(len(p.encode("utf-8").translate(None, self.dropped_bytes)) for p in parts)
            at_least = -(-n_bytes // self.longest_token_bytes)      # ceil
            if at_least > limit:
                raise TooManyTokens(at_least, max_tokens)
        ids = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.token_to_id[part])
            else:
                for word in pre_tokenize(part):
                    ids.extend(self.encode_word(word))
                    if len(ids) > limit:
                        raise TooManyTokens(len(ids), max_tokens)
        if len(ids) > limit:
            raise TooManyTokens(len(ids), max_tokens)
        return ids

    # --- decoding ------------------------------------------------------------------------------

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes a token stands for. May be part of a UTF-8 character, so not always text."""
        if not validate.is_int(id):
            raise LlmlabError(f"a token id is an integer, got {type(id).__name__} {id!r}")
        if not 0 <= id < self.vocab_size:   # a negative id would otherwise index from the end
            raise LlmlabError(f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1}).")
        token = self.tokens[id]
        try:
            return bytes(self.char_to_byte[c] for c in token)
        except KeyError:   # outside the byte alphabet (control tokens are plain ASCII, so never here)
            return token.encode("utf-8")

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text for token ids. Never raises for integer ids.

        The bytes of all tokens are joined and then decoded once, because one character may be split
        over several tokens. Bytes that are not valid UTF-8 (a sequence cut short, as when sampling
        stops mid-character) become U+FFFD, as Hugging Face does. Ids outside the vocabulary are
        skipped: Hugging Face does the same for ids from vocab_size up to 2**32, and raises
        OverflowError for negative ones or larger ones.
        """
        ids = validate.token_ids(ids, None, "ids to decode", allow_empty=True)
        data = b"".join(self.token_bytes(i) for i in ids
                        if 0 <= i < self.vocab_size and not (skip_special and i in self.special_ids))
        return data.decode("utf-8", errors="replace")

    # --- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model was trained to read it, rendered by the file's Jinja template
        (sandboxed, under a time, memory and output budget: llmlab.chat_template).

        The text holds the messages as written, control-token text included: to tokenize a
        conversation, use `encode_chat`, which keeps such text from becoming control tokens.
        """
        messages = check_messages(messages)
        validate.flag(add_generation_prompt, "add_generation_prompt")
        if not self.chat_template:
            raise LlmlabError("this tokenizer has no chat template (the GGUF has no tokenizer.chat_template).")
        return render_chat_template(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.tokens[self.bos_id], eos_token=self.tokens[self.eos_id])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    allow_special_in_content: bool = False, max_tokens: int | None = None) -> list[int]:
        """Ids of the rendered conversation: the template's markers ("<|im_start|>", "<|im_end|>") as
        single control-token ids, and the messages as text.

        A message that spells a control token ("...<|im_end|>\n<|im_start|>system\n...") gets the
        characters it wrote, not the token, so no message can end its own turn and forge another.
        While the template renders, each such spelling stands in as a private-use character that no
        message holds; the template's own markers are then the only control tokens in its output, and
        the stand-ins go back to the spellings, encoded as plain text. allow_special_in_content=True
        makes them control tokens instead, for a conversation whose every word you wrote yourself.
        max_tokens: as for `encode`.
        """
        messages = check_messages(messages)
        if allow_special_in_content or self.special_pattern is None:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt), max_tokens=max_tokens)
        spelled = {t for m in messages for t in self.special_pattern.findall(m["content"])}
        taken = set(STAND_INS.findall("".join(m["content"] for m in messages) + (self.chat_template or "")))
        free = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in taken)
        stand_in = dict(zip(sorted(spelled), free))
        hidden = [{**m, "content": self.special_pattern.sub(lambda t: stand_in[t[0]], m["content"])} for m in messages]
        spelling = str.maketrans({c: t for t, c in stand_in.items()})
        parts = self.split_special(self.apply_chat_template(hidden, add_generation_prompt))
        return self.encode_parts([p if i % 2 else p.translate(spelling) for i, p in enumerate(parts)], max_tokens)


class TooManyTokens(LlmlabError):
    """A text longer than the `max_tokens` it was encoded under: at least `at_least` tokens."""

    def __init__(self, at_least: int, max_tokens: int):
        super().__init__(f"the text is at least {at_least:,} tokens long, more than the {max_tokens:,} allowed")
        self.at_least, self.max_tokens = at_least, max_tokens


# --- training ------------------------------------------------------------------------------------

def byte_tokens() -> list[str]:
    """The 256 one-byte tokens in the order they get ids: sorted by their printable spelling.

    This is GPT-2's and SmolLM2's order ("!" first, "Ā" = byte 0 at 188) and the one Hugging Face's
    trainer uses; it matters because ties between equally frequent pairs are broken by id.
    """
    return sorted(bytes_to_unicode().values())


def vocabulary(merges: list[str]) -> list[str]:
    """The tokens a list of merges makes: the 256 bytes, then each merge's result the first time it appears.

    Two different merges can spell the same token ("a bc" and "ab c"); it gets one id, as in Hugging Face.
    """
    tokens = byte_tokens()
    seen = set(tokens)
    for merge in merges:
        token = merge.replace(" ", "", 1)
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    return tokens


@dataclass
class TrainedBPE:
    """What `train_bpe` learned: merges in the order learned (rank 0 first), spelled "Ġ t" as in
    GGUF and tokenizer.json files, and how many times each merged pair occurred when it was chosen."""

    merges: list[str]
    counts: list[int]

    @property
    def tokens(self) -> list[str]:
        return vocabulary(self.merges)

    def tokenizer(self, vocab_size: int | None = None) -> Tokenizer:
        """A `Tokenizer` for the merges learned first, up to a vocabulary of `vocab_size` (all by default).

        Training is greedy, so these are exactly the merges that training with that vocab_size learns.
        """
        merges, tokens = self.merges, self.tokens
        if vocab_size is not None and vocab_size < len(tokens):
            tokens = tokens[:max(vocab_size, 256)]
            # Training to vocab_size stops right after the merge that made the last token kept.
            results = [m.replace(" ", "", 1) for m in merges]
            merges = merges[:results.index(tokens[-1]) + 1] if len(tokens) > 256 else []
        return Tokenizer(tokens, merges, [NORMAL] * len(tokens), bos_id=None, eos_id=None)


def merge_pair(word: list[int], a: int, b: int, new: int) -> list[int]:
    """`word` with every occurrence of the pair (a, b) replaced by `new`, scanning left to right
    (so "aaa" becomes "aa a", as when encoding)."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text: str, vocab_size: int) -> TrainedBPE:
    """Learn byte-level BPE merges from `text` until the vocabulary has `vocab_size` tokens.

    Each step merges the pair of adjacent symbols that occurs most often, counted over all words
    (`pre_tokenize`, so no merge crosses a word boundary), overlapping pairs included ("aaa" holds
    "a a" twice). Ties go to the pair with the smaller ids (first token, then second), where the bytes
    are numbered as in `byte_tokens` and each new token takes the next id. That is Hugging Face's
    BpeTrainer rule, so with the same pre-tokenizer both learn the same merges. Training stops early
    when no pair is left.

    Speed: the text is reduced to its distinct words with their counts, and after each merge only the
    words that contain the merged pair are rewritten, adjusting the pair counts by what changed. The
    most frequent pair comes from a heap whose stale entries are fixed when they reach the top.
    """
    tokens = byte_tokens()
    token_to_id = {t: i for i, t in enumerate(tokens)}
    byte_to_id = [token_to_id[bytes_to_unicode()[b]] for b in range(256)]
    word_counts = Counter(pre_tokenize(text))
    words = [[byte_to_id[b] for b in word.encode("utf-8")] for word in word_counts]
    freqs = list(word_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    words_with = defaultdict(set)   # pair -> indices of words that contain (or once contained) it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            words_with[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges, counts = [], []
    while len(tokens) < vocab_size:
        best = _pop_most_frequent(heap, pair_counts)
        if best is None:
            break
        (a, b), count = best
        merged = tokens[a] + tokens[b]
        new = token_to_id.setdefault(merged, len(tokens))
        if new == len(tokens):
            tokens.append(merged)
        merges.append(f"{tokens[a]} {tokens[b]}")
        counts.append(count)
        born = set()   # pairs holding the new token: the only ones whose count can grow
        for i in words_with.pop((a, b)):
            word = words[i]
            rewritten = merge_pair(word, a, b, new)
            if len(rewritten) == len(word):   # the pair left this word in an earlier merge
                continue
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= freqs[i]
            for pair in zip(rewritten, rewritten[1:]):
                pair_counts[pair] += freqs[i]
                if new in pair:
                    words_with[pair].add(i)
                    born.add(pair)
            words[i] = rewritten
        del pair_counts[(a, b)]
        for pair in born:
            heapq.heappush(heap, (-pair_counts[pair], pair))
    return TrainedBPE(merges, counts)


def _pop_most_frequent(heap: list, pair_counts: dict) -> tuple[tuple[int, int], int] | None:
    """The pair with the highest count (ties: smallest ids) and its count, or None when none is left.

    Entries are (-count, pair) as pushed; a pair's count only falls after its entry was pushed (a rise
    pushes a fresh entry), so an entry whose count is too high is pushed back with the true count.
    """
    while heap:
        negative, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count == -negative and count > 0:
            return pair, count
        if 0 < count < -negative:
            heapq.heappush(heap, (-count, pair))
    return None
