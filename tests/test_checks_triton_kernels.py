"""The checks of notebook 11 accept right kernels and refuse wrong ones with advice that says what is wrong.

The kernels run through Triton's interpreter on a CPU. Each wrong kernel below changes one thing in a
right one; for the attention softmax, the place the locator names follows from the mistake alone:
without the scale, query 0 (one visible key, weight 1 whatever the scale) is right and query 1 wrong;
a mask that hides a query's own key leaves query 0 with no key (nan); an unmasked row is wrong at
query 0, key 0; a row stored only where the key is visible leaves query 0, key 1 unwritten.
"""

import re

import pytest
import torch

import llmlab.kernels  # noqa: F401 -- before triton: switches on the interpreter without a GPU
import triton
import triton.language as tl

from llmlab.checks import CheckFailed
from llmlab.checks.locate import StepFailed
from llmlab.checks.triton_kernels import check_attention_softmax, check_bias_relu, check_int4_dot, check_scaled_add


@triton.jit
def scaled_add_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, a * tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask),
             mask=mask)


@triton.jit
def scaled_add_unmasked_store(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, a * tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask))


@triton.jit
def plain_add(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def bias_relu_kernel(x_ptr, bias_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + tl.program_id(0) * n_cols + cols, mask=mask)
    tl.store(out_ptr + tl.program_id(0) * n_cols + cols, tl.maximum(x + tl.load(bias_ptr + cols, mask=mask), 0.0),
             mask=mask)


@triton.jit
def bias_without_relu(x_ptr, bias_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + tl.program_id(0) * n_cols + cols, mask=mask)
    tl.store(out_ptr + tl.program_id(0) * n_cols + cols, x + tl.load(bias_ptr + cols, mask=mask), mask=mask)


@triton.jit
def attention_softmax(scores_ptr, out_ptr, seq, scale, BLOCK: tl.constexpr, SCALE: tl.constexpr = True,
                      DIAGONAL: tl.constexpr = 0, CAUSAL: tl.constexpr = True, SUBTRACT_MAX: tl.constexpr = True,
                      STORE_ROW: tl.constexpr = True):
    """Right with the defaults; each flag turned off or moved plants one mistake."""
    row = tl.program_id(0)
    query = row % seq
    keys = tl.arange(0, BLOCK)
    s = tl.load(scores_ptr + row * seq + keys, mask=keys < seq, other=float("-inf"))
    if SCALE:
        s = s * scale
    if CAUSAL:
        s = tl.where(keys <= query + DIAGONAL, s, float("-inf"))
    if SUBTRACT_MAX:
        s = s - tl.max(s, axis=0)
    numerator = tl.exp(s)
    if STORE_ROW:
        tl.store(out_ptr + row * seq + keys, numerator / tl.sum(numerator, axis=0), mask=keys < seq)
    else:
        tl.store(out_ptr + row * seq + keys, numerator / tl.sum(numerator, axis=0), mask=keys <= query)


class Planted:
    """attention_softmax with some constexpr flags fixed: launched as the check launches the reader's kernel."""

    def __init__(self, **flags):
        self.flags = flags

    def __getitem__(self, grid):
        return lambda *args, **kwargs: attention_softmax[grid](*args, **kwargs, **self.flags)


@triton.jit
def attention_softmax_unmasked_store(scores_ptr, out_ptr, seq, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    keys = tl.arange(0, BLOCK)
    s = tl.where(keys <= row % seq, tl.load(scores_ptr + row * seq + keys, mask=keys < seq) * scale, float("-inf"))
    numerator = tl.exp(s - tl.max(s, axis=0))
    tl.store(out_ptr + row * seq + keys, numerator / tl.sum(numerator, axis=0))


def test_placeholders_say_what_to_fill_in(capsys, llm):
    check_scaled_add(None)
    check_bias_relu(None)
    check_attention_softmax(None, llm)
    out = capsys.readouterr().out
    assert all(f"Fill in {name} above" in out
               for name in ("scaled_add_kernel", "bias_relu_kernel", "attention_softmax_kernel"))


def test_right_kernels_pass(capsys, llm):
    check_scaled_add(scaled_add_kernel)
    check_bias_relu(bias_relu_kernel)
    check_attention_softmax(Planted(), llm)
    assert capsys.readouterr().out.count("Correct") == 3


@pytest.mark.parametrize("kernel, advice", [
    (scaled_add_unmasked_store, "wrote past the end of out"),
    (plain_add, "got x + y; multiply x by a"),
])
def test_scaled_add_mistakes(kernel, advice):
    with pytest.raises(CheckFailed, match=re.escape(advice)):
        check_scaled_add(kernel)


def test_bias_relu_without_relu():
    with pytest.raises(CheckFailed, match="negative values must become 0"):
        check_bias_relu(bias_without_relu)


@pytest.mark.parametrize("flags, position, advice", [
    (dict(SCALE=False), {"head": 0, "query position": 1, "key position": 0}, "unscaled scores"),
    (dict(DIAGONAL=-1), {"head": 0, "query position": 0, "key position": 0}, "Query 0 got no key"),
    (dict(CAUSAL=False), {"head": 0, "query position": 0, "key position": 0}, "Every key got a weight"),
    (dict(STORE_ROW=False), {"head": 0, "query position": 0, "key position": 1}, "stored too, as weight 0"),
])
def test_attention_softmax_mistakes_are_located_in_layer_0(llm, flags, position, advice):
    with pytest.raises(StepFailed, match=advice) as failure:
        check_attention_softmax(Planted(**flags), llm)
    assert (failure.value.layer, failure.value.operation, failure.value.position) == (0, "attention weights", position)


def test_attention_softmax_without_the_max_overflows_on_sharper_scores(llm):
    # Real scores stay far below exp's limit, so the three layers pass; the sharper scores do not.
    with pytest.raises(StepFailed, match="exp overflowed") as failure:
        check_attention_softmax(Planted(SUBTRACT_MAX=False), llm)
    assert failure.value.layer == llm.config.n_layers - 1 and "sharper" in failure.value.operation


def test_attention_softmax_store_past_the_end(llm):
    with pytest.raises(CheckFailed, match="wrote past the end of out"):
        check_attention_softmax(attention_softmax_unmasked_store, llm)


def int4_dot(q, scales, offsets, x, group_size, with_offsets=True, group_of=lambda g: g):
    """y = W x from the int4 codes, per group: scale times the group's sum of q x, plus offset times its sum of x."""
    n, k = q.shape
    x_groups = x.reshape(k // group_size, group_size)
    q_dot_x = (q.float().reshape(n, k // group_size, group_size) * x_groups).sum(-1)
    y = scales[:, group_of(torch.arange(k // group_size))] * q_dot_x
    return (y + offsets * x_groups.sum(-1) * with_offsets).sum(-1)


def test_int4_dot_right_passes_and_each_missing_term_is_named(capsys, llm):
    check_int4_dot(int4_dot, llm)
    assert "Correct" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match="real scales and offsets.*offset times the sum of x"):
        check_int4_dot(lambda *args: int4_dot(*args, with_offsets=False), llm)
    with pytest.raises(CheckFailed, match="real scales, offsets 0.*that group's scale"):
        check_int4_dot(lambda *args: int4_dot(*args, group_of=lambda g: g.flip(0)), llm)   # groups' scales swapped
    with pytest.raises(CheckFailed, match="shape"):
        check_int4_dot(lambda *args: int4_dot(*args)[None], llm)
