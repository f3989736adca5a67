"""The checks of notebook 06 accept right answers and refuse wrong ones with a message that says where."""

import matplotlib
import pytest

from llmlab.checks import CheckFailed
from llmlab.checks.kv_cache import check_70b_kv_bytes, check_append
from llmlab.checks.locate import StepFailed

matplotlib.use("Agg")      # the locator draws its heat map on a failure


def append_kv(k_buf, v_buf, start_pos, k, v):
    end = start_pos + k.shape[2]
    k_buf[:, :, start_pos:end] = k
    v_buf[:, :, start_pos:end] = v
    return k_buf[:, :, :end], v_buf[:, :, :end]


def whole_buffer(k_buf, v_buf, start_pos, k, v):
    append_kv(k_buf, v_buf, start_pos, k, v)
    return k_buf, v_buf


def one_position_late(k_buf, v_buf, start_pos, k, v):
    end = start_pos + k.shape[2]
    k_buf[:, :, start_pos + 1:end + 1] = k
    v_buf[:, :, start_pos + 1:end + 1] = v
    return k_buf[:, :, 1:end + 1], v_buf[:, :, 1:end + 1]


def copies(k_buf, v_buf, start_pos, k, v):
    keys, values = append_kv(k_buf, v_buf, start_pos, k, v)
    return keys.clone(), values.clone()


def new_tensors(k_buf, v_buf, start_pos, k, v):
    return append_kv(k_buf.clone(), v_buf.clone(), start_pos, k, v)


def last_position_only(k_buf, v_buf, start_pos, k, v):
    end = start_pos + k.shape[2]
    k_buf[:, :, end - 1:end] = k[:, :, -1:]
    v_buf[:, :, end - 1:end] = v[:, :, -1:]
    return k_buf[:, :, :end], v_buf[:, :, :end]


def values_in_wrong_layer_after_prefill(k_buf, v_buf, start_pos, k, v):
    """Right in the prefill, and for the decode steps writes only head 0."""
    if start_pos == 0:
        return append_kv(k_buf, v_buf, start_pos, k, v)
    end = start_pos + k.shape[2]
    k_buf[:, :1, start_pos:end] = k[:, :1]
    v_buf[:, :, start_pos:end] = v
    return k_buf[:, :, :end], v_buf[:, :, :end]


def test_right_answers_pass(llm, capsys):
    check_70b_kv_bytes(2 * 80 * 8 * 128 * 8192 * 2)
    check_append(append_kv, llm)
    assert capsys.readouterr().out.count("Correct") == 2


def test_the_placeholder_asks_for_an_answer(llm, capsys):
    check_append(lambda *args: None, llm)
    assert "Fill in append_kv" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, where, advice", [
    (whole_buffer, "layer 0 · keys returned, appending 10 at position 0", "expected shape (2, 3, 10, 64)"),
    (one_position_late, "layer 0 · keys in k_buf, appending 10 at position 0", "each at its own place"),
    (new_tensors, "layer 0 · keys in k_buf, appending 10 at position 0", "in place"),
    (last_position_only, "layer 0 · keys returned, appending 10 at position 0", "return positions 0 .. start_pos+new-1"),
    (values_in_wrong_layer_after_prefill, "layer 0 · keys returned, appending 1 at position 10", "KV head 1"),
])
def test_wrong_appends_are_located(llm, wrong, where, advice):
    with pytest.raises(StepFailed) as failure:
        check_append(wrong, llm)
    assert str(failure.value).startswith(where)
    assert advice in str(failure.value)


def test_copies_are_refused(llm):
    with pytest.raises(CheckFailed, match="copies: return slices"):
        check_append(copies, llm)


@pytest.mark.parametrize("wrong, advice", [(2 * 80 * 8 * 128 * 8192 * 4, "2 bytes per value"),
                                           (2 * 80 * 64 * 128 * 8192 * 2, "64 query heads"),
                                           (80 * 8 * 128 * 8192 * 2, "the keys only"),
                                           (2 * 80 * 8 * 128 * 8192 * 2 + 1, "is not right")])
def test_wrong_70b_bytes_are_refused(wrong, advice):
    with pytest.raises(CheckFailed, match=advice):
        check_70b_kv_bytes(wrong)


def test_one_returned_tensor_is_refused(llm):
    with pytest.raises(CheckFailed, match=r"two tensors, \(keys, values\)"):
        check_append(lambda k_buf, v_buf, start_pos, k, v: append_kv(k_buf, v_buf, start_pos, k, v)[0], llm)
