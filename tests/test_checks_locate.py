"""The mistake locator names the exact layer, operation and position of a planted mistake, on the real model.

The right implementations here are written from the notebooks' formulas, independently of the checks;
each planted mistake changes one thing in them. The expected location follows from the mistake alone:
RoPE with its halves swapped is right at position 0 (every angle is 0 there) and wrong from position 1;
a mask that lets query i see key i+1 is wrong at query 0, key 1, after the mask; scores without the
division by sqrt(d_k) are wrong at their very first element.
"""

import math

import pytest
import torch

from llmlab.checks import CheckFailed
from llmlab.checks.attention import check_attention
from llmlab.checks.embeddings import check_rope
from llmlab.checks.locate import Step, StepFailed, locate, tolerance

PROMPT = "To be, or not to be, that is the question"


def rope(x, positions, swap_halves=False):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-second half, first half); with `swap_halves`,
    rotate_half's halves are swapped, (first half, -second half): nothing changes where sin = 0."""
    d = x.shape[-1]
    theta = 100000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)     # θ_i = base^(-2i/d)
    angle = (positions.double()[:, None] * theta).float().repeat(1, 2)        # (seq, d): both halves
    first, second = x[..., : d // 2], x[..., d // 2:]
    rotated = torch.cat([first, -second] if swap_halves else [-second, first], dim=-1)
    return x * angle.cos() + rotated * angle.sin()


def causal_mask(n, off_by_one=False):
    return torch.ones(n, n, dtype=torch.bool).tril(diagonal=1 if off_by_one else 0)


def attention_scores(q, k, scaled=True):
    scores = torch.einsum("hid,hjd->hij", q, k)
    return scores / math.sqrt(q.shape[-1]) if scaled else scores


def attention(q, k, v, mask=causal_mask, scores=attention_scores):
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    weights = scores(q, k).masked_fill(~mask(q.shape[1]), float("-inf")).softmax(dim=-1)
    return weights @ v


def located(check, *args) -> StepFailed:
    with pytest.raises(StepFailed) as failure:
        check(*args)
    return failure.value


def test_right_rope_passes(llm, capsys):
    check_rope(rope, llm, PROMPT)
    assert capsys.readouterr().out.startswith("Correct")


def test_rope_with_halves_swapped_is_located_at_layer_0_q_position_1(llm):
    failure = located(check_rope, lambda x, p: rope(x, p, swap_halves=True), llm, PROMPT)
    assert (failure.layer, failure.operation) == (0, "q after RoPE")
    assert failure.position == {"head": 0, "position": 1, "channel": 0}
    assert "layer 0 · q after RoPE: first wrong at head 0, position 1, channel 0" in str(failure)


def test_right_attention_passes(llm, capsys):
    check_attention(causal_mask, attention_scores, attention, llm, PROMPT)
    assert capsys.readouterr().out.startswith("Correct")


def test_mask_off_by_one_is_located_after_the_mask_at_query_0_key_1(llm):
    def mask(n):
        return causal_mask(n, off_by_one=True)
    failure = located(check_attention, mask, attention_scores,
                      lambda q, k, v: attention(q, k, v, mask=mask), llm, PROMPT)
    assert (failure.layer, failure.operation) == (0, "after mask")
    assert failure.position == {"head": 0, "query position": 0, "key position": 1}


def test_missing_sqrt_dk_is_located_at_the_first_score(llm):
    def unscaled(q, k):
        return attention_scores(q, k, scaled=False)
    failure = located(check_attention, causal_mask, unscaled,
                      lambda q, k, v: attention(q, k, v, scores=unscaled), llm, PROMPT)
    assert (failure.layer, failure.operation) == (0, "scores")
    assert failure.position == {"head": 0, "query position": 0, "key position": 0}


def test_kv_heads_repeated_in_the_wrong_order_are_located_at_head_1_of_the_output(llm):
    def tiled(q, k, v):       # query head h reads KV head h % 3 instead of h // 3; head 0 is still right
        group = q.shape[0] // k.shape[0]
        return attention(q, k.repeat(group, 1, 1), v.repeat(group, 1, 1), scores=attention_scores)
    failure = located(check_attention, causal_mask, attention_scores, tiled, llm, PROMPT)
    assert (failure.layer, failure.operation, failure.position["head"]) == (0, "output", 1)


def test_a_mistake_in_one_later_layer_is_reported_there_once():
    right = torch.arange(12.0).reshape(3, 4)
    wrong = right.clone()
    wrong[2, 1] += 1.0
    steps = [Step("output", right, right, ("position", "channel"), layer) for layer in range(3)]
    steps.append(Step("output", wrong, right, ("position", "channel"), 3))
    with pytest.raises(StepFailed) as failure:
        locate(steps, draw=False)
    assert (failure.value.layer, failure.value.position) == (3, {"position": 2, "channel": 1})
    assert isinstance(failure.value, CheckFailed)


def test_tolerance_follows_the_dtype():
    value = torch.full((4,), 100.0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        expected = value.to(dtype)
        just_inside = expected.double() * (1 + tolerance(dtype))       # the RMS term doubles the allowance
        assert locate([Step("x", just_inside, expected, ("channel",))], draw=False) == 1
        outside = expected.double() * (1 + 3 * tolerance(dtype))
        with pytest.raises(StepFailed):
            locate([Step("x", outside, expected, ("channel",))], draw=False)
    assert tolerance(torch.float32) < tolerance(torch.float16) < tolerance(torch.bfloat16)
    assert tolerance(torch.bool) == 0


def test_a_wrong_shape_is_reported_before_any_value():
    with pytest.raises(StepFailed, match=r"layer 2 · scores: expected shape \(2, 3\)"):
        locate([Step("scores", torch.zeros(3, 2), torch.zeros(2, 3), ("query position", "key position"), 2)])
