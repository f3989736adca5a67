"""A chat template is code from a model file: each hostile one ends in a clear LlmlabError, fast, and
without the process growing (llmlab.chat_template renders in a child under a time and memory budget)."""

import copy
import resource
import time

import pytest

from llmlab.chat_template import render_chat_template
from llmlab.errors import LlmlabError
from llmlab.llm import _bundled_tokenizer_or_none

HI = [{"role": "user", "content": "Hi!"}]

HOSTILE = [
    pytest.param("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                 r"ran for more than 1 s and was stopped", id="nested-loops",
                 marks=pytest.mark.bad_input(kind="a chat template whose loops never end (10^10 iterations)",
                                             gets="LlmlabError after 1 s: the template was stopped")),
    pytest.param("{% for i in range(10**9) %}{% for j in range(10**9) %}{% endfor %}{% endfor %}",
                 r"Range too big", id="huge-range",
                 marks=pytest.mark.bad_input(kind="a chat template that loops over range(10**9)",
                                             gets="LlmlabError at once: the sandbox's range limit")),
    pytest.param("{{ 'x' * 10**10 }}", r"asked for more than 1 GiB of memory", id="string-repeat",
                 marks=pytest.mark.bad_input(kind="a chat template that builds a 10 GB string",
                                             gets="LlmlabError at once: over the 1 GiB memory budget")),
    pytest.param("{{ 'x'|center(10**10) }}", r"asked for more than 1 GiB of memory", id="filter-at-compile-time",
                 marks=pytest.mark.bad_input(kind="a chat template whose constant Jinja folds while compiling",
                                             gets="LlmlabError at once: compiling is under the budget too")),
    pytest.param("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
                 r"produced more than 16,777,216 characters", id="output-flood",
                 marks=pytest.mark.bad_input(kind="a chat template that prints 10 GB",
                                             gets="LlmlabError at 16 M characters of output")),
    pytest.param("{% for m in messages %}{{ m['content'] }", r"syntax error on line 1: unexpected '}'",
                 id="syntax-error",
                 marks=pytest.mark.bad_input(kind="a chat template with a syntax error",
                                             gets="LlmlabError naming the line and the problem, not Jinja's traceback")),
    pytest.param("{{ ''.__class__.__mro__ }}", r"sandbox forbids.*'__class__' of 'str'", id="escape-attribute",
                 marks=pytest.mark.bad_input(kind="a chat template reaching for ''.__class__.__mro__",
                                             gets="LlmlabError: the sandbox forbids it")),
    pytest.param("{% set x = messages %}{{ x.append(1) }}", r"sandbox forbids.*'append' of 'list'", id="mutate",
                 marks=pytest.mark.bad_input(kind="a chat template that changes the conversation it is given",
                                             gets="LlmlabError: the sandbox forbids it")),
    pytest.param("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", r"recurses too deeply", id="recursion",
                 marks=pytest.mark.bad_input(kind="a chat template that recurses without end",
                                             gets="LlmlabError: nests or recurses too deeply")),
    pytest.param("{{ messages[0]['content'] + 1 }}", r"the chat template failed: TypeError", id="template-bug",
                 marks=pytest.mark.bad_input(kind="a chat template with a bug (str + int)",
                                             gets="LlmlabError naming the error")),
]


@pytest.mark.parametrize("source, message", HOSTILE)
def test_hostile_template_is_a_clear_error_fast_and_bounded(source, message):
    grown_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(LlmlabError, match=message):
        render_chat_template(source, messages=HI, add_generation_prompt=True)
    assert time.monotonic() - start < 2.5
    # ru_maxrss is in KiB: this process (the parent) allocated nothing for the template
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown_before < 100 * 1024


@pytest.mark.bad_input(kind="a model file whose chat template hangs", gets="LlmlabError from chat(), after 1 s")
def test_hostile_template_from_the_model_file_stops_chat():
    tok = copy.copy(_bundled_tokenizer_or_none())
    tok.chat_template = HOSTILE[0].values[0]
    with pytest.raises(LlmlabError, match="ran for more than 1 s"):
        tok.encode_chat(HI)


def test_the_template_still_renders_what_it_should():
    assert render_chat_template("{% for m in messages %}[{{ m.role }}] {{ m['content'] }}{% endfor %}",
                                messages=HI) == "[user] Hi!"
    with pytest.raises(LlmlabError, match="the chat template rejected the conversation: no tools"):
        render_chat_template("{{ raise_exception('no tools') }}")
