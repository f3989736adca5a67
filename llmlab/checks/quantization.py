"""Checks for the exercises of notebooks/09_quantization.ipynb.

Expected answers come from the shipped GGUF file itself (the bytes it really stores) and from the
block formats' definitions written out here in NumPy, never from a stored number and never from
llmlab's own quantizers, so a bug there cannot make a wrong answer pass.
"""

from __future__ import annotations

import functools

import numpy as np

from llmlab.gguf import GGUFFile
from llmlab.llm import bundled_model_path

from . import check, unanswered

BLOCK = 32                    # weights per Q4_1 block
# fp16 keeps 11 significant bits, so rounding a value to fp16 (as the file stores d and m) moves it by
# at most half an ulp: 2^-11 of its size. An answer may round d and m, or not.
FP16_ROUNDING = 2.0 ** -11
Q4_1_BLOCK_BYTES = 2 + 2 + BLOCK // 2   # fp16 d, fp16 m, 32 nibbles


@functools.cache
def _file() -> GGUFFile:
    return GGUFFile(bundled_model_path())


def _q4_1_blocks(name: str, rows: int) -> np.ndarray:
    """The first `rows` rows of a Q4_1 tensor as the file stores them: (blocks, 20) uint8."""
    return _file().raw(name)[:rows].reshape(-1, Q4_1_BLOCK_BYTES)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) values 0..15: byte j holds value j (low nibble) and j + 16 (high)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _fp16(two_bytes: np.ndarray) -> np.float32:
    return np.float32(two_bytes.copy().view(np.float16)[0])


def _q8_0_row(name: str, row: int) -> np.ndarray:
    """One row of a Q8_0 tensor as float32: blocks of an fp16 d and 32 int8 q, w = d * q."""
    blocks = _file().raw(name)[row].reshape(-1, 2 + BLOCK)
    return np.concatenate([_fp16(block[:2]) * block[2:].view(np.int8).astype(np.float32) for block in blocks])


@check
def check_q4_1_bytes(answer) -> None:
    """`answer`: the bytes that all the Q4_1 tensors of the shipped file take."""
    if unanswered(answer, "q4_1_bytes"):
        return
    file = _file()
    names = [name for name, t in file.tensors.items() if t.type_name == "Q4_1"]
    weights = sum(int(np.prod(file.tensors[name].shape)) for name in names)
    expected = sum(file.raw(name).nbytes for name in names)        # what the file really holds
    blocks = weights // BLOCK
    assert answer != weights // 2, (
        "that is 4 bits per weight and nothing else: each block of 32 weights also stores its scale d "
        "and minimum m, 2 bytes (fp16) each")
    assert answer != weights // 2 + 2 * blocks, "that counts d only: a Q4_1 block stores d *and* m"
    assert answer != weights * 4, "that is fp32 (4 bytes per weight): the file stores 4-bit values"
    assert answer == expected, (
        f"{answer:,} is not right: blocks = weights / 32, and each block is 2 (d) + 2 (m) + 16 (32 nibbles) bytes")
    print(f"Correct: {expected:,} bytes for {weights:,} weights = {8 * expected / weights:g} bits per weight "
          f"(4 for q, 32 bits of d and m shared by 32 weights).")


@check
def check_q4_1_block(quantize_block) -> None:
    """`quantize_block(w)`: a NumPy array of 32 float32 weights -> (d, m, q): Q4_1's scale and minimum
    (numbers; rounded to fp16 as the file stores them, or not) and a NumPy array of 32 whole numbers in
    0..15, with w ≈ d * q + m."""
    if unanswered(quantize_block(np.linspace(-1, 1, BLOCK, dtype=np.float32)), "quantize_block"):
        return
    rng = np.random.default_rng(9)
    outlier = rng.normal(0, 0.02, BLOCK).astype(np.float32)
    outlier[5] = 0.4
    tests = {"a block of the Q8_0 embedding": _q8_0_row("token_embd.weight", 1000)[:BLOCK],   # not on a 4-bit grid
             "another embedding block": _q8_0_row("token_embd.weight", 30000)[64:64 + BLOCK],
             "random weights with one outlier": outlier,
             "weights that are all negative": -np.abs(rng.normal(0, 0.05, BLOCK)).astype(np.float32) - 0.1}
    for what, w in tests.items():
        d, m, q = _block_answer(quantize_block(w.copy()), what)
        d_true, m_true = (w.max() - w.min()) / 15, w.min()
        if np.isclose(d, (w.max() - w.min()) / 16, rtol=FP16_ROUNDING):
            raise AssertionError(f"{what}: d = (max - min) / 16, but 16 levels 0..15 are 15 steps apart: "
                                 "divide by 15")
        if np.isclose(d, np.abs(w).max() / 7, rtol=FP16_ROUNDING) or np.isclose(d, np.abs(w).max() / 15, rtol=FP16_ROUNDING):
            raise AssertionError(f"{what}: that is a symmetric scale (from max |w|): Q4_1 spans min..max")
        assert np.isclose(d, d_true, rtol=FP16_ROUNDING, atol=0), (
            f"{what}: d should be (max w - min w) / 15 = {d_true:.6g}, got {d:.6g}")
        assert np.isclose(m, m_true, rtol=FP16_ROUNDING, atol=0), (
            f"{what}: m should be the block's minimum {m_true:.6g}, got {m:.6g}")
        assert q.shape == (BLOCK,), f"{what}: q should hold 32 values, got shape {q.shape}"
        assert np.all(q == np.round(q)) and q.min() >= 0 and q.max() <= 15, (
            f"{what}: q must be whole numbers in 0..15 (round, then clip), got {q.min()}..{q.max()}")
        error = np.abs(d * q.astype(np.float64) + m - w)
        # Half a step, plus what rounding d and m to fp16 may add (m moves by up to |m| 2^-11, and d's
        # rounding, times q <= 15, by up to 15 d 2^-11), plus float32's rounding of w.
        bound = d_true / 2 + FP16_ROUNDING * (abs(m_true) + 15 * d_true) + 1e-6 * np.abs(w).max()
        if np.array_equal(q, np.floor((w - m_true) / d_true)) and error.max() > bound:
            raise AssertionError(f"{what}: q is rounded down (floor or int()): round to the nearest level")
        assert error.max() <= bound, (
            f"{what}: |d*q + m - w| reaches {error.max():.3g}, above d/2 = {d_true / 2:.3g}: "
            "round (w - m) / d to the nearest integer")
    # The shipped weights are on a Q4_1 grid already: a block re-quantized gives back the file's own d, m, q.
    for b, block in enumerate(_q4_1_blocks("blk.0.attn_q.weight", 1)[:4]):
        stored_d, stored_m, stored_q = _fp16(block[0:2]), _fp16(block[2:4]), _nibbles(block[4:])
        # The block's 32 weights: d and m are fp16 values already, so rounding them to fp16 changes nothing.
        d, m, q = _block_answer(quantize_block(stored_d * stored_q.astype(np.float32) + stored_m), f"block {b}")
        assert np.isclose(d, stored_d, rtol=1e-5) and np.isclose(m, stored_m, rtol=1e-6), (
            f"block {b} of blk.0.attn_q: the file stores d = {stored_d:.6g}, m = {stored_m:.6g}; "
            f"you got {d:.6g}, {m:.6g}")
        assert np.array_equal(q, stored_q), (
            f"block {b} of blk.0.attn_q: your q differs from the 32 values the file stores")
    print("Correct: d = (max - min) / 15 and m = min on 4 blocks, every error within d/2 (give or take fp16's "
          "rounding of d and m); on the shipped "
          "weights you recover the file's own d, m and 4-bit values.")


def _block_answer(answer, what: str) -> tuple[float, float, np.ndarray]:
    """quantize_block's (d, m, q) as (float, float, NumPy array), or advice on what it should return."""
    assert isinstance(answer, (tuple, list)) and len(answer) == 3, (
        f"{what}: quantize_block should return three things, (d, m, q), got {type(answer).__name__}")
    d, m, q = answer
    try:
        return float(d), float(m), np.asarray(q)
    except TypeError:
        raise AssertionError(f"{what}: d and m should be single numbers, got {type(d).__name__} and "
                             f"{type(m).__name__}") from None


@check
def check_pack_q4_1(pack_block) -> None:
    """`pack_block(q)`: 32 values in 0..15 -> the 16 bytes a Q4_1 block stores them in (uint8)."""
    if unanswered(pack_block(np.zeros(BLOCK, dtype=np.uint8)), "pack_block"):
        return
    for name in ("blk.0.attn_q.weight", "blk.15.ffn_down.weight"):
        for b, block in enumerate(_q4_1_blocks(name, 1)[:6]):
            stored = block[4:]
            q = _nibbles(stored)
            got = np.asarray(pack_block(q.copy()))
            where = f"block {b} of {name}"
            assert got.shape == (16,), f"{where}: 32 values make 16 bytes, got shape {got.shape}"
            neighbours = (q[0::2] | (q[1::2] << 4)).astype(np.uint8)
            if np.array_equal(got, neighbours) and not np.array_equal(neighbours, stored):
                raise AssertionError(f"{where}: you packed neighbours (2j, 2j+1) into byte j, as pack_int4 does; "
                                     "GGUF puts values j and j + 16 in byte j")
            swapped = (q[16:] | (q[:16] << 4)).astype(np.uint8)
            if np.array_equal(got, swapped) and not np.array_equal(swapped, stored):
                raise AssertionError(f"{where}: the nibbles are swapped: value j goes in the low 4 bits, "
                                     "j + 16 in the high 4")
            assert np.array_equal(got, stored), (f"{where}: the file stores {stored.tobytes().hex(' ')}, "
                                                 f"you made {got.astype(np.uint8).tobytes().hex(' ')}")
    print("Correct: byte for byte the blocks the file stores, in two tensors.")
