"""The checks of notebook 00 accept right answers and refuse wrong ones with a message that says what is wrong."""

import pytest

from llmlab.checks import CheckFailed
from llmlab.checks.tour import check_greedy_generate, check_kv_bytes


def greedy_generate(llm, ids, n):
    new = []
    for _ in range(n):
        new.append(int(llm.logits(ids + new)[-1].argmax()))
    return new


def test_right_answers_pass(llm, capsys):
    c = llm.config
    check_kv_bytes(2 * c.n_layers * c.n_kv_heads * c.head_dim * 8192 * 4, c)
    check_greedy_generate(greedy_generate, llm)
    assert capsys.readouterr().out.count("Correct") == 2


def test_placeholders_say_what_to_fill_in(llm, capsys):
    check_kv_bytes(None, llm.config)
    check_greedy_generate(lambda llm, ids, n: None, llm)
    out = capsys.readouterr().out
    assert "Fill in kv_bytes" in out and "Fill in greedy_generate" in out


@pytest.mark.parametrize("factor, message", [(0.5, "key AND a value"), (3, "only the key/value heads")])
def test_wrong_kv_bytes_are_explained(llm, factor, message):
    c = llm.config
    with pytest.raises(CheckFailed, match=message):
        check_kv_bytes(int(2 * c.n_layers * c.n_kv_heads * c.head_dim * 8192 * 4 * factor), c)


def with_prompt(llm, ids, n):
    return ids + greedy_generate(llm, ids, n)


def first_row(llm, ids, n):
    new = []
    for _ in range(n):
        new.append(int(llm.logits(ids + new)[0].argmax()))
    return new


def not_appended(llm, ids, n):                       # the same prediction n times: the loop never grows
    return [int(llm.logits(ids)[-1].argmax())] * n


@pytest.mark.parametrize("wrong, message", [
    (with_prompt, "only the n new ones"),
    (first_row, "the LAST row"),
    (not_appended, "new token 1 is .*append it to ids"),
])
def test_wrong_loops_are_explained(llm, wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_greedy_generate(wrong, llm)
