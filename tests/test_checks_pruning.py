"""The checks of notebook 10 accept right answers and refuse wrong ones with a message that says what is wrong."""

import re

import pytest
import torch

from llmlab.checks import CheckFailed
from llmlab.checks.pruning import check_mask_2_4, check_soft_gradient, check_wanda_mask


# --- right answers, written independently of the checks ------------------------------------------

def mask_2_4_by_hand(scores):
    groups = scores.reshape(scores.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(scores.shape)


def wanda_by_hand(W, X, sparsity):
    scores = W.abs() * X.norm(dim=0)
    n_pruned = round(sparsity * W.shape[1])
    keep = torch.ones_like(W, dtype=torch.bool)
    keep.scatter_(1, scores.topk(n_pruned, dim=1, largest=False).indices, False)
    return keep


def soft_gradient(z_s, z_t, T):
    return T * ((z_s / T).softmax(-1) - (z_t / T).softmax(-1))


# --- wrong answers, each a typical mistake ---------------------------------------------------------

def keep_smallest_2_of_4(scores):
    return ~mask_2_4_by_hand(scores)


def half_of_each_row(scores):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.topk(scores.shape[1] // 2, dim=1).indices, True)
    return keep


def groups_of_rows(scores):
    if scores.shape[0] % 4:
        return mask_2_4_by_hand(scores)
    return mask_2_4_by_hand(scores.T.contiguous()).T


def keep_3_of_4(scores):
    groups = scores.reshape(scores.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(3, dim=-1).indices, True)
    return keep.reshape(scores.shape)


def first_two_of_4(scores):
    keep = torch.zeros(scores.shape[0], scores.shape[1] // 4, 4, dtype=torch.bool)
    keep[..., :2] = True
    return keep.reshape(scores.shape)


def with_scores(score):
    def wanda(W, X, sparsity):
        s = score(W, X)
        keep = torch.ones_like(W, dtype=torch.bool)
        keep.scatter_(1, s.topk(round(sparsity * W.shape[1]), dim=1, largest=False).indices, False)
        return keep
    return wanda


def wanda_per_matrix(W, X, sparsity):
    scores = (W.abs() * X.norm(dim=0)).flatten()
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[scores.topk(round(sparsity * scores.numel()), largest=False).indices] = False
    return keep.view(W.shape)


def wanda_rounded_down(W, X, sparsity):
    scores = W.abs() * X.norm(dim=0)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep.scatter_(1, scores.topk(int(sparsity * W.shape[1]), dim=1, largest=False).indices, False)
    return keep


def wanda_inverted(W, X, sparsity):
    return ~wanda_by_hand(W, X, sparsity)


def wanda_prunes_highest(W, X, sparsity):
    scores = W.abs() * X.norm(dim=0)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep.scatter_(1, scores.topk(round(sparsity * W.shape[1]), dim=1).indices, False)
    return keep


# --- the tests ---------------------------------------------------------------------------------------

def test_right_answers_pass(capsys):
    check_mask_2_4(mask_2_4_by_hand)
    check_wanda_mask(wanda_by_hand)
    check_soft_gradient(soft_gradient)
    assert capsys.readouterr().out.count("Correct") == 3


def test_a_mask_of_zeros_and_ones_passes_too(capsys):
    check_mask_2_4(lambda scores: mask_2_4_by_hand(scores).int())
    assert "Correct" in capsys.readouterr().out


def test_placeholders_say_what_to_fill_in(capsys):
    check_mask_2_4(lambda scores: None)
    check_wanda_mask(lambda W, X, sparsity: None)
    check_soft_gradient(lambda z_s, z_t, T: None)
    out = capsys.readouterr().out
    for name in ("mask_2_4_by_hand", "wanda_by_hand", "soft_gradient"):
        assert f"Fill in {name} above" in out


@pytest.mark.parametrize("wrong, message", [
    (keep_smallest_2_of_4, "True at the 2 smallest"),
    (half_of_each_row, "not 2 in every group of 4"),
    (groups_of_rows, "4 consecutive output rows"),
    (keep_3_of_4, "keep 3 weights; every group of 4 keeps exactly 2"),
    (first_two_of_4, "Keep the 2 largest of each group"),
    (lambda scores: mask_2_4_by_hand(scores).float() * 2, "True (kept) or False (pruned)"),
    (lambda scores: mask_2_4_by_hand(scores)[:, :-4], "the scores' shape"),
])
def test_wrong_2_4_masks_are_explained(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        check_mask_2_4(wrong)


@pytest.mark.parametrize("wrong, message", [
    (with_scores(lambda W, X: W.abs()), "that is magnitude pruning"),
    (with_scores(lambda W, X: W.abs() * X.pow(2).sum(0)), "take its square root"),
    (with_scores(lambda W, X: W.abs() * X.abs().mean(0)), "the L2 norm"),
    (wanda_per_matrix, "within each output row"),
    (wanda_rounded_down, "use round()"),
    (wanda_inverted, "True must mean kept"),
    (wanda_prunes_highest, "you pruned the highest scores"),
])
def test_wrong_wanda_masks_are_explained(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        check_wanda_mask(wrong)


def softmax_t(z, T):
    return (z / T).softmax(-1)


@pytest.mark.parametrize("wrong, message", [
    (lambda z_s, z_t, T: T * (softmax_t(z_t, T) - softmax_t(z_s, T)), "the sign is flipped"),
    (lambda z_s, z_t, T: (softmax_t(z_s, T) - softmax_t(z_t, T)) / T, "gradient of the KL alone"),
    (lambda z_s, z_t, T: softmax_t(z_s, T) - softmax_t(z_t, T), "misses a factor"),
    (lambda z_s, z_t, T: T * T * (softmax_t(z_s, T) - softmax_t(z_t, T)), "one T too many"),
    (lambda z_s, z_t, T: T * (z_s.softmax(-1) - z_t.softmax(-1)), "softened distributions"),
    (lambda z_s, z_t, T: soft_gradient(z_s, z_t, T)[:-1], "one entry per token"),
    (lambda z_s, z_t, T: soft_gradient(z_s, z_t, T) + 1e-3, "autograd's"),
])
def test_wrong_gradients_are_explained(wrong, message):
    with pytest.raises(CheckFailed, match=re.escape(message)):
        check_soft_gradient(wrong)
