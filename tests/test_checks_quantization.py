"""The checks of notebook 09 accept right answers and refuse wrong ones with a message that says what is wrong."""

import numpy as np
import pytest

from llmlab.checks import CheckFailed
from llmlab.checks.quantization import check_pack_q4_1, check_q4_1_block, check_q4_1_bytes
from llmlab.gguf import GGUFFile
from llmlab.llm import bundled_model_path


@pytest.fixture(scope="module")
def q4_1_weights():
    file = GGUFFile(bundled_model_path())
    return sum(int(np.prod(t.shape)) for t in file.tensors.values() if t.type_name == "Q4_1")


def quantize_block(w):
    m = w.min()
    d = (w.max() - m) / 15
    q = np.clip(np.round((w - m) / d), 0, 15).astype(np.uint8)
    return d, m, q


def quantize_block_fp16(w):
    """As llama.cpp stores a block: q from the exact d and m, d and m then rounded to fp16."""
    d, m, q = quantize_block(w)
    return np.float16(d), np.float16(m), q


def quantize_block_fp16_first(w):
    """d and m rounded to fp16 first, q computed from the rounded ones: right too."""
    m = np.float16(w.min())
    d = np.float16((w.max() - w.min()) / 15)
    return d, m, np.clip(np.round((w - np.float32(m)) / np.float32(d)), 0, 15)


def pack_block(q):
    return (q[:16] | (q[16:] << 4)).astype(np.uint8)


def test_right_answers_pass(q4_1_weights, capsys):
    check_q4_1_bytes(q4_1_weights // 32 * 20)
    for answer in (quantize_block, quantize_block_fp16, quantize_block_fp16_first,
                   lambda w: list(quantize_block(w))):
        check_q4_1_block(answer)
    check_pack_q4_1(pack_block)
    assert capsys.readouterr().out.count("Correct") == 6


@pytest.mark.parametrize("wrong, advice", [
    (lambda w: ((w.max() - w.min()) / 16, w.min(), np.round((w - w.min()) * 16 / (w.max() - w.min())).clip(0, 15)), "divide by 15"),
    (lambda w: (np.abs(w).max() / 7, 0.0, np.zeros(32)), "symmetric scale"),
    (lambda w: ((w.max() - w.min()) / 15, w.min(), np.floor((w - w.min()) * 15 / (w.max() - w.min()))), "rounded down"),
    (lambda w: ((w.max() - w.min()) / 15, w.max(), np.zeros(32)), "m should be the block's minimum"),
    (lambda w: ((w.max() - w.min()) / 15, w.min()), "three things"),
    (lambda w: ((w.max() - w.min()) / 15 * 1.01, w.min(), quantize_block(w)[2]), "d should be (max w - min w) / 15"),
])
def test_wrong_blocks_are_refused(wrong, advice):
    with pytest.raises(CheckFailed) as failure:
        check_q4_1_block(wrong)
    assert advice in str(failure.value)


def test_wrong_bytes_and_packing_are_refused(q4_1_weights):
    with pytest.raises(CheckFailed, match="also stores its scale d"):
        check_q4_1_bytes(q4_1_weights // 2)
    with pytest.raises(CheckFailed, match="counts d only"):
        check_q4_1_bytes(q4_1_weights // 2 + 2 * (q4_1_weights // 32))
    with pytest.raises(CheckFailed, match="as pack_int4 does"):
        check_pack_q4_1(lambda q: (q[0::2] | (q[1::2] << 4)).astype(np.uint8))
    with pytest.raises(CheckFailed, match="nibbles are swapped"):
        check_pack_q4_1(lambda q: (q[16:] | (q[:16] << 4)).astype(np.uint8))
