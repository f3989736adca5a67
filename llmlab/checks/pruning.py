"""Checks for the exercises of notebooks/10_pruning_and_distillation.ipynb.

The expected answers are computed here from the definitions, in NumPy (float64) or by PyTorch's
autograd, never with llmlab.compress, so a bug there cannot make a wrong answer pass. A mask is
judged by its rule, not against one stored mask: the shipped weights come from a 4-bit file and tie
often, and wherever scores tie, any choice that keeps the right number of the highest is right.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from llmlab.gguf import GGUFFile
from llmlab.llm import bundled_model_path

from . import check, unanswered


@functools.cache
def _weight(name: str, rows: int) -> np.ndarray:
    """The first `rows` rows of a tensor of the shipped file, dequantized: (rows, in) float32."""
    return GGUFFile(bundled_model_path()).tensor(name)[:rows].copy()


def _as_mask(got, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The answer as a NumPy bool array of `shape`, or an AssertionError that says what is wrong with it."""
    assert got is not None, f"{what}: your function returned None; return the mask"
    if isinstance(got, torch.Tensor):
        got = got.detach().cpu().numpy()
    got = np.asarray(got)
    assert got.shape == shape, f"{what}: the mask should have the scores' shape {shape}, got {got.shape}"
    if got.dtype != bool:
        assert np.isin(got, (0, 1)).all(), (
            f"{what}: a mask holds True (kept) or False (pruned) for every weight; got values such as "
            f"{got.flatten()[~np.isin(got.flatten(), (0, 1))][:3]}")
        got = got.astype(bool)
    return got


def _order_violation(keep: np.ndarray, scores: np.ndarray) -> tuple | None:
    """(group index, lowest kept score, highest pruned score) of the first group (last axis) where a kept
    score is below a pruned one, or None where every group keeps its highest scores."""
    kept_low = np.where(keep, scores, np.inf).min(axis=-1)
    pruned_high = np.where(keep, -np.inf, scores).max(axis=-1)
    bad = kept_low < pruned_high * (1 - 1e-6)              # a relative slack for float32 answers' rounding
    if not bad.any():
        return None
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return first, kept_low[first], pruned_high[first]


# --- Exercise 1: a 2:4 mask ----------------------------------------------------------------------

def _follows_2_4(keep: np.ndarray, scores: np.ndarray) -> bool:
    groups, s = keep.reshape(keep.shape[0], -1, 4), scores.reshape(scores.shape[0], -1, 4)
    return bool((groups.sum(-1) == 2).all()) and _order_violation(groups, s) is None


@check
def check_mask_2_4(mask_2_4_by_hand) -> None:
    """`mask_2_4_by_hand(scores)`: scores (out, in), in a multiple of 4 -> a bool keep mask of the same
    shape with, in every row, exactly the 2 highest scores of each 4 consecutive inputs kept."""
    if unanswered(mask_2_4_by_hand(torch.ones(4, 8)), "mask_2_4_by_hand"):
        return
    rng = np.random.default_rng(10)
    channel_norms = rng.lognormal(0.0, 0.5, 1536)
    channel_norms[[17, 700, 1229]] = (40.0, 15.0, 90.0)        # a few huge input channels, as in the real model
    cases = {
        "the hand-made row [0.1, 0.9, 0.5, 0.3, 2, 1, 0, 3]": np.array([[0.1, 0.9, 0.5, 0.3, 2.0, 1.0, 0.0, 3.0]]),
        "|W| of blk.0.attn_q, rows 0..63 (4-bit weights: many ties)": np.abs(_weight("blk.0.attn_q.weight", 64)),
        "Wanda-like scores |W|·‖X‖ of blk.5.ffn_down, rows 0..31": (np.abs(_weight("blk.5.ffn_down.weight", 32))
                                                                     * channel_norms[None, :]),
    }
    for what, scores in cases.items():
        scores = scores.astype(np.float32)
        got = _as_mask(mask_2_4_by_hand(torch.from_numpy(scores.copy())), scores.shape, what)
        if _follows_2_4(got, scores):
            continue
        if _follows_2_4(~got, scores):
            raise AssertionError(f"{what}: your mask is True at the 2 smallest scores of each group: either it "
                                 f"marks the pruned weights (True must mean kept) or it keeps the smallest "
                                 f"(keep the 2 largest)")
        if scores.shape[0] % 4 == 0 and _follows_2_4(got.T, scores.T):
            raise AssertionError(f"{what}: your groups are 4 consecutive output rows of a column; 2:4 groups "
                                 f"are 4 consecutive inputs (columns) of each row")
        groups, s = got.reshape(got.shape[0], -1, 4), scores.reshape(scores.shape[0], -1, 4)
        counts = groups.sum(-1)
        if (got.sum(1) == got.shape[1] // 2).all() and (counts != 2).any():
            row, g = (int(i) for i in np.argwhere(counts != 2)[0])
            raise AssertionError(f"{what}: each row keeps half its weights, but not 2 in every group of 4: row "
                                 f"{row}, inputs {4 * g}..{4 * g + 3} keep {counts[row, g]}. Choose within each "
                                 f"group of 4 consecutive inputs, not within the whole row")
        if (counts != 2).any():
            row, g = (int(i) for i in np.argwhere(counts != 2)[0])
            raise AssertionError(f"{what}: row {row}, inputs {4 * g}..{4 * g + 3} (scores {np.round(s[row, g], 4)}) "
                                 f"keep {counts[row, g]} weights; every group of 4 keeps exactly 2")
        (row, g), low, high = _order_violation(groups, s)
        raise AssertionError(f"{what}: row {row}, inputs {4 * g}..{4 * g + 3} have scores {np.round(s[row, g], 4)}; "
                             f"your mask {groups[row, g].astype(int)} keeps {low:.4g} and prunes {high:.4g}. "
                             f"Keep the 2 largest of each group")
    print("Correct: exactly 2 of every 4 consecutive inputs kept, the 2 with the highest scores, on a "
          "hand-made row, real 4-bit weights (ties and all) and Wanda-like scores.")


# --- Exercise 2: Wanda from a layer's inputs ------------------------------------------------------

def _follows_rows(keep: np.ndarray, scores: np.ndarray, n_pruned: int) -> bool:
    """Every row prunes exactly n_pruned weights, none scoring above a kept one of its row."""
    return bool(((~keep).sum(1) == n_pruned).all()) and _order_violation(keep, scores) is None


@check
def check_wanda_mask(wanda_by_hand) -> None:
    """`wanda_by_hand(W, X, sparsity)`: a weight (out, in) and its inputs X (tokens, in) -> the bool keep
    mask (out, in) that prunes, in every output row, the round(sparsity · in) weights with the lowest
    |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is input channel j's L2 norm over the tokens."""
    if unanswered(wanda_by_hand(torch.ones(2, 4), torch.ones(3, 4), 0.5), "wanda_by_hand"):
        return
    rng = np.random.default_rng(11)
    cases = []
    for name, rows, tokens, outliers in (("blk.12.attn_q.weight", 96, 200, {247: 60.0, 308: 14.0, 507: 9.0}),
                                         ("blk.20.ffn_down.weight", 48, 150, {675: 50.0, 347: 30.0, 1233: 20.0})):
        w = _weight(name, rows)
        x = rng.normal(0.0, 1.0, (tokens, w.shape[1])) * rng.lognormal(0.0, 0.4, w.shape[1])
        for channel, size in outliers.items():
            x[:, channel] *= size
        for sparsity in (0.3, 0.5):
            cases.append((f"{name} rows 0..{rows - 1} at sparsity {sparsity}", w, x.astype(np.float32), sparsity))
    for what, w, x, sparsity in cases:
        n_in = w.shape[1]
        n_pruned = round(sparsity * n_in)
        got = _as_mask(wanda_by_hand(torch.from_numpy(w.copy()), torch.from_numpy(x.copy()), sparsity), w.shape, what)
        x64, w64 = x.astype(np.float64), np.abs(w.astype(np.float64))
        norm = np.sqrt((x64 ** 2).sum(axis=0))                      # ‖X_j‖₂ over the tokens: (in,)
        scores = w64 * norm[None, :]
        if _follows_rows(got, scores, n_pruned):
            continue
        pruned_per_row = (~got).sum(1)
        if _follows_rows(~got, scores, n_pruned):
            raise AssertionError(f"{what}: your mask is True where a weight is pruned; True must mean kept")
        if _follows_rows(got, -scores, n_pruned):
            raise AssertionError(f"{what}: you pruned the highest scores; prune the lowest |W_ij|·‖X_j‖")
        in_all = abs(pruned_per_row.sum() - sparsity * w.size) <= w.shape[0]    # the matrix's share, about
        if in_all and pruned_per_row.min() != pruned_per_row.max():
            raise AssertionError(f"{what}: the matrix loses the right number of weights in all, but row by row "
                                 f"from {pruned_per_row.min()} to {pruned_per_row.max()}: Wanda compares the "
                                 f"scores within each output row, and every row loses round(sparsity · in) "
                                 f"= {n_pruned}")
        if (pruned_per_row != n_pruned).any():
            row = int(np.argmax(pruned_per_row != n_pruned))
            hint = (f" (int() rounds {sparsity} · {n_in} = {sparsity * n_in:g} down; use round())"
                    if pruned_per_row[row] == int(sparsity * n_in) else "")
            raise AssertionError(f"{what}: row {row} prunes {pruned_per_row[row]} weights; every row prunes "
                                 f"round(sparsity · in) = {n_pruned}{hint}")
        if _follows_rows(got, w64, n_pruned):
            raise AssertionError(f"{what}: that is magnitude pruning: you ranked by |W_ij| alone. Multiply "
                                 f"each weight by its input channel's norm ‖X_j‖₂ first")
        if _follows_rows(got, w64 * norm[None, :] ** 2, n_pruned):
            raise AssertionError(f"{what}: you weighed by ‖X_j‖₂², the sum of squares; take its square root")
        if _follows_rows(got, w64 * np.abs(x64).sum(axis=0)[None, :], n_pruned):
            raise AssertionError(f"{what}: you weighed by the sum (or mean) of |x_tj|; Wanda uses the L2 norm "
                                 f"sqrt(Σ_t x_tj²)")
        (row,), low, high = _order_violation(got, scores)
        raise AssertionError(f"{what}: row {row} keeps a weight of score |W_ij|·‖X_j‖₂ = {low:.4g} and prunes "
                             f"one of {high:.4g}; prune the lowest scores of each row")
    print("Correct: in every row, exactly round(sparsity · in) weights pruned, those with the lowest "
          "|W_ij|·‖X_j‖₂, on two real layers with outlier input channels, at sparsities 0.3 and 0.5.")


# --- Exercise 3: the soft term's gradient ---------------------------------------------------------

def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _autograd_soft_gradient(z_s: np.ndarray, z_t: np.ndarray, temperature: float) -> np.ndarray:
    """d/dz_s of T² KL(softmax(z_t/T) || softmax(z_s/T)), by PyTorch's autograd in float64."""
    with torch.enable_grad():
        student = torch.tensor(z_s, dtype=torch.float64, requires_grad=True)
        log_p = torch.log_softmax(torch.tensor(z_t, dtype=torch.float64) / temperature, dim=-1)
        log_q = torch.log_softmax(student / temperature, dim=-1)
        loss = temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum()
        loss.backward()
    return student.grad.numpy()


@check
def check_soft_gradient(soft_gradient) -> None:
    """`soft_gradient(z_s, z_t, T)`: one position's student and teacher logits (vocab,) -> the gradient
    (vocab,) of the soft term T² KL(softmax(z_t/T) || softmax(z_s/T)) with respect to z_s, in closed form."""
    if unanswered(soft_gradient(torch.zeros(3), torch.zeros(3), 2.0), "soft_gradient"):
        return
    rng = np.random.default_rng(12)
    for temperature in (2.0, 4.0, 1.0, 0.5):                     # T = 1 last: there several mistakes coincide
        z_s, z_t = rng.normal(0.0, 3.0, 50), rng.normal(0.0, 3.0, 50)
        got = soft_gradient(torch.tensor(z_s, dtype=torch.float64), torch.tensor(z_t, dtype=torch.float64),
                            temperature)
        what = f"at T = {temperature}"
        assert got is not None, f"{what}: your function returned None; return the gradient"
        got = np.asarray(got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
        assert got.shape == z_s.shape, (
            f"{what}: the gradient has one entry per token, shape {z_s.shape}; got {got.shape}")
        expected = _autograd_soft_gradient(z_s, z_t, temperature)
        if np.allclose(got, expected, rtol=1e-6, atol=1e-9):
            continue
        p, q = _softmax(z_t / temperature), _softmax(z_s / temperature)
        close = functools.partial(np.allclose, got, rtol=1e-6, atol=1e-9)
        if close(-expected):
            raise AssertionError(f"{what}: the sign is flipped: the gradient pushes z_s up where the student's q "
                                 f"is below the teacher's p, so it is T (q - p), not T (p - q)")
        if close((q - p) / temperature):
            raise AssertionError(f"{what}: (q - p) / T is the gradient of the KL alone; the soft term is T² times "
                                 f"the KL")
        if close(q - p):
            raise AssertionError(f"{what}: q - p misses a factor: the chain rule through z_s / T gives 1/T, and "
                                 f"the T² in front gives T²: T² · (q - p) / T")
        if close(temperature ** 2 * (q - p)):
            raise AssertionError(f"{what}: one T too many: d(z_s/T)/dz_s = 1/T takes one off the T² in front")
        if close(temperature * (_softmax(z_s) - _softmax(z_t))):
            raise AssertionError(f"{what}: p and q are the softened distributions softmax(z/T), not softmax(z)")
        worst = int(np.argmax(np.abs(got - expected)))
        raise AssertionError(f"{what}: token {worst}: your gradient {got[worst]:.6g}, autograd's {expected[worst]:.6g}")
    print("Correct: T (q - p), equal to autograd's gradient of T² KL at T = 0.5, 1, 2 and 4. The 1/T of the "
          "chain rule and the T² in front leave T (q - p): the T² keeps the soft term's pull from fading as T grows.")
