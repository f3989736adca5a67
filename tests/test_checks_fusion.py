"""The checks of notebook 08 accept right answers and refuse wrong ones with a message that says what is wrong."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from llmlab.checks import CheckFailed
from llmlab.checks.fusion import check_geglu, check_greedy_step, first_graph_break


def geglu(gate, up):
    inner = math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)
    return 0.5 * gate * (1 + torch.tanh(inner)) * up


def geglu_bytes(n, s):
    return 21 * n * s, 3 * n * s         # nine operations: six read one tensor, three read two; each writes one


def greedy_step(model, cache, token, pos, stop_id):
    logits = model(token, start_pos=pos, cache=cache, last_only=True)[:, -1]
    done = token == stop_id
    return torch.where(done, token, logits.argmax(-1, keepdim=True)), pos + (~done[:, 0]).long()


def step_with_int_position(model, cache, token, pos, stop_id):
    logits = model(token, start_pos=int(pos[0]), cache=cache, last_only=True)[:, -1]
    done = token == stop_id
    return torch.where(done, token, logits.argmax(-1, keepdim=True)), pos + (~done[:, 0]).long()


def step_with_host_stop_test(model, cache, token, pos, stop_id):
    logits = model(token, start_pos=pos, cache=cache, last_only=True)[:, -1]
    nxt, new_pos = logits.argmax(-1, keepdim=True), pos.clone()
    for row in range(token.shape[0]):
        if int(token[row, 0]) == stop_id:
            nxt[row, 0] = stop_id
        else:
            new_pos[row] += 1
    return nxt, new_pos


def step_without_stop(model, cache, token, pos, stop_id):
    logits = model(token, start_pos=pos, cache=cache, last_only=True)[:, -1]
    return logits.argmax(-1, keepdim=True), pos + 1


def test_geglu_right_answer_passes(capsys):
    check_geglu(geglu, geglu_bytes)
    assert "Correct" in capsys.readouterr().out


def test_geglu_placeholders_say_what_to_fill_in(capsys):
    check_geglu(lambda gate, up: None, geglu_bytes)
    check_geglu(geglu, lambda n, s: None)
    out = capsys.readouterr().out
    assert "Fill in geglu above" in out and "Fill in geglu_bytes above" in out


@pytest.mark.parametrize("wrong, message", [
    (lambda g, u: F.gelu(g) * u, "exact (erf) GELU"),
    (lambda g, u: F.gelu(g, approximate="tanh") * u, "calls PyTorch's GELU"),
    (lambda g, u: geglu(u, g), "swapped"),
    (lambda g, u: geglu(g, torch.ones_like(u)), "multiply by up"),
])
def test_geglu_wrong_function_is_named(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        check_geglu(wrong, geglu_bytes)


def test_geglu_wrong_byte_counts_are_explained():
    with pytest.raises(CheckFailed, match="your geglu moves"):
        check_geglu(geglu, lambda n, s: (5 * n * s, 3 * n * s))
    with pytest.raises(CheckFailed, match="3 n s"):
        check_geglu(geglu, lambda n, s: (21 * n * s, 2 * n * s))


def test_greedy_step_right_answer_passes(capsys):
    check_greedy_step(greedy_step)
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (step_with_int_position, "its own position"),
    (step_with_host_stop_test, "graph break"),
    (step_without_stop, "has finished"),
])
def test_greedy_step_wrong_answers_are_explained(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_greedy_step(wrong)


def branch_on_a_value(x):
    if x.sum() > 0:          # the host needs the sum to choose
        return x * 2
    return x


def test_first_graph_break_points_at_the_line():
    problem, graphs = first_graph_break(branch_on_a_value, torch.ones(3))
    assert graphs == 0 and "at: if x.sum() > 0:" in problem
    assert first_graph_break(lambda x: x * 2, torch.ones(3)) == (None, 1)
