"""The checks of notebook 12 accept right answers and locate planted mistakes on the real model.

Each wrong answer changes one thing in a right one, and where the locator stops follows from the
mistake alone: with the state fed in exact before every tile, a sum that is not rescaled is still right
after tile 0 (there is nothing to rescale yet) and wrong after tile 1 at the first query that sees a key
of tile 1 with a higher score, that is query 16 or later; a max taken over the tile alone leaves query 0,
whose keys in tile 1 are all masked, at -inf. An average of the partial outputs is wrong at the first
merge; exp(lse) without subtracting the larger one passes on the real model and overflows only on the
larger scores.
"""

import pytest
import torch

from llmlab.checks import CheckFailed
from llmlab.checks.flash_attention import TILE, check_merge, check_online_update
from llmlab.checks.locate import StepFailed


def online_update(m, l, acc, scores, v, rescale_l=True, running_max=True, normalise=False):
    m_new = torch.maximum(m, scores.max(dim=1).values) if running_max else scores.max(dim=1).values
    alpha = torch.exp(m - m_new)
    p = torch.exp(scores - m_new[:, None])
    l_new = (l * alpha if rescale_l else l) + p.sum(dim=1)
    acc_new = acc * alpha[:, None] + p @ v
    return m_new, l_new, acc_new / l_new[:, None] if normalise else acc_new


def merge(o1, lse1, o2, lse2, overflowing=False):
    lse = torch.log(torch.exp(lse1) + torch.exp(lse2)) if overflowing else torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[:, None] * o1 + torch.exp(lse2 - lse)[:, None] * o2, lse


def test_placeholders_say_what_to_fill_in(capsys, llm):
    check_online_update(lambda m, l, acc, scores, v: None, llm)
    check_merge(lambda o1, lse1, o2, lse2: None, llm)
    out = capsys.readouterr().out
    assert "Fill in online_update above" in out and "Fill in merge above" in out


def test_right_answers_pass(capsys, llm):
    check_online_update(online_update, llm)
    check_merge(merge, llm)
    assert capsys.readouterr().out.count("Correct") == 2


def test_sum_not_rescaled_is_located_after_tile_1(llm):
    with pytest.raises(StepFailed, match="rescaled by exp") as failure:
        check_online_update(lambda *args: online_update(*args, rescale_l=False), llm)
    assert failure.value.layer == 0 and failure.value.operation.startswith("running sum l after key tile 1")
    assert failure.value.position["query position"] >= TILE


def test_max_of_the_tile_alone_is_located_at_query_0(llm):
    with pytest.raises(StepFailed, match="largest score seen so far") as failure:
        check_online_update(lambda *args: online_update(*args, running_max=False), llm)
    assert failure.value.operation.startswith("running max m after key tile 1")
    assert failure.value.position == {"head": 0, "query position": 0}


def test_normalised_accumulator_is_located_after_tile_0(llm):
    with pytest.raises(StepFailed, match="no division by l") as failure:
        check_online_update(lambda *args: online_update(*args, normalise=True), llm)
    assert failure.value.operation.startswith("accumulator acc after key tile 0")


def test_wrong_shapes_are_refused(llm):
    with pytest.raises(CheckFailed, match="expected shapes"):
        check_online_update(lambda m, l, acc, scores, v: (m[:, None], l, acc), llm)


def test_plain_average_is_located_at_the_first_merge(llm):
    with pytest.raises(StepFailed, match="share exp") as failure:
        check_merge(lambda o1, lse1, o2, lse2: ((o1 + o2) / 2, torch.logaddexp(lse1, lse2)), llm)
    assert failure.value.layer == 0 and failure.value.operation.startswith("output after merging keys 0–16 with split 1")


def test_overflowing_merge_fails_on_large_scores_only(llm):
    with pytest.raises(CheckFailed, match="exp\\(lse\\) overflowed") as failure:
        check_merge(lambda *args: merge(*args, overflowing=True), llm)
    assert not isinstance(failure.value, StepFailed)          # the real model's log-sum-exps are small
