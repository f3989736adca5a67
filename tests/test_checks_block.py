"""The block check of notebook 04 accepts a right wiring and locates wrong ones at the piece that gets a wrong input."""

import pytest

from llmlab.checks import CheckFailed
from llmlab.checks.block import check_block
from llmlab.checks.locate import StepFailed

PROMPT = "The Eiffel Tower is in the city of"


def block_forward(x, attn_norm, attention, mlp_norm, mlp):
    """h = x + Attention(RMSNorm_1(x)), x' = h + MLP(RMSNorm_2(h)): the two equations of the notebook."""
    h = x + attention(attn_norm(x))
    return h + mlp(mlp_norm(h))


def residual_from_the_normed_copy(x, attn_norm, attention, mlp_norm, mlp):
    normed = attn_norm(x)
    h = normed + attention(normed)
    return h + mlp(mlp_norm(h))


def attention_on_the_raw_stream(x, attn_norm, attention, mlp_norm, mlp):
    attn_norm(x)
    h = x + attention(x)
    return h + mlp(mlp_norm(h))


def no_second_residual(x, attn_norm, attention, mlp_norm, mlp):
    h = x + attention(attn_norm(x))
    return mlp(mlp_norm(h))


def test_right_block_passes(llm, capsys):
    check_block(block_forward, llm, PROMPT)
    out = capsys.readouterr().out
    assert out.startswith("Correct") and "same top token" in out


@pytest.mark.parametrize("wrong, operation", [
    (residual_from_the_normed_copy, "input of mlp_norm"),
    (attention_on_the_raw_stream, "input of attention"),
    (no_second_residual, "output"),
])
def test_wrong_wiring_is_located_at_layer_0_position_0(llm, wrong, operation):
    with pytest.raises(StepFailed) as failure:
        check_block(wrong, llm, PROMPT)
    assert (failure.value.layer, failure.value.operation) == (0, operation)
    assert failure.value.position == {"position": 0, "channel": 0}


def test_a_piece_called_twice_is_named(llm):
    def twice(x, attn_norm, attention, mlp_norm, mlp):
        h = x + attention(attn_norm(x))
        mlp_norm(h)
        return h + mlp(mlp_norm(h))
    with pytest.raises(CheckFailed, match="calls mlp_norm 2 times"):
        check_block(twice, llm, PROMPT)


def test_placeholder_asks_for_an_answer(llm, capsys):
    check_block(lambda *pieces: None, llm, PROMPT)
    assert capsys.readouterr().out.startswith("Fill in block_forward")
