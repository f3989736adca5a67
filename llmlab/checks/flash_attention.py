"""Checks for the exercises of notebooks/12_flash_attention.ipynb.

Expected answers are independent PyTorch computations over the whole row of scores at once
(torch.softmax, torch.logsumexp), never the streamed or merged quantities the exercise builds.
Scores are drawn both small and large: large ones overflow exp in fp32 (e^89 > 3.4e38) unless the
running maximum is subtracted first, as FlashAttention must.
"""

from __future__ import annotations

import torch

from . import unanswered


def check_online_update(online_update) -> None:
    """`online_update(m, l, acc, scores, v) -> (m, l, acc)`: one block of the online softmax.

    m, l: (rows,) running max and running sum of exp(score - m); acc: (rows, d) running
    sum of exp(score - m) * v, unnormalised; scores: (rows, block); v: (block, d).
    """
    rows, d, n_keys, block = 4, 8, 53, 16
    gen = torch.Generator().manual_seed(12)

    def start():
        return torch.full((rows,), float("-inf")), torch.zeros(rows), torch.zeros(rows, d)

    first = online_update(*start(), torch.randn(rows, block, generator=gen), torch.randn(block, d, generator=gen))
    if unanswered(first, "online_update"):
        return
    assert isinstance(first, tuple) and len(first) == 3, "return the three running quantities: (m, l, acc)"
    for scale in (1.0, 60.0):
        scores = torch.randn(rows, n_keys, generator=gen) * scale
        v = torch.randn(n_keys, d, generator=gen)
        m, l, acc = start()
        for begin in range(0, n_keys, block):             # blocks of 16 keys, the last one of 5
            m, l, acc = online_update(m, l, acc, scores[:, begin:begin + block], v[begin:begin + block])
        where = f"scores of size ~{scale:g}, {n_keys} keys in blocks of {block}"
        assert m.shape == (rows,) and l.shape == (rows,) and acc.shape == (rows, d), (
            f"{where}: expected shapes m {(rows,)}, l {(rows,)}, acc {(rows, d)}; got "
            f"{tuple(m.shape)}, {tuple(l.shape)}, {tuple(acc.shape)}")
        assert torch.isfinite(l).all() and torch.isfinite(acc).all(), (
            f"{where}: l or acc is inf or nan: exp overflowed. Subtract the running max m before exp")
        want_m = scores.max(dim=1).values
        assert torch.equal(m, want_m), (
            f"{where}: m should be the running max: torch.maximum(m, scores.max(dim=1).values)")
        want_l = torch.exp(scores - want_m[:, None]).sum(dim=1)
        assert torch.allclose(l, want_l, rtol=1e-5), (
            f"{where}: l is not sum(exp(s - m)) over all keys. When the max rises from m to m_new, what was summed "
            f"so far must be rescaled by exp(m - m_new) before the block's sum exp(s - m_new) is added")
        want_o = torch.softmax(scores, dim=1) @ v
        right = torch.allclose(acc / l[:, None], want_o, rtol=1e-5, atol=1e-5)
        if not right and torch.allclose(acc, want_o, atol=1e-5):
            raise AssertionError(f"{where}: acc is already normalised; keep it a sum (divide by l only at the "
                                 f"end): a normalised acc can only be rescaled with the old l, which is not passed")
        assert right, (
            f"{where}: acc / l is not softmax(scores) @ v. acc must be rescaled by the same factor exp(m - m_new) "
            f"as l, then get p @ v added, with p = exp(scores - m_new)")
    print("Correct: the streamed max, sum and output equal the softmax of the whole row, "
          "also for scores whose exp would overflow fp32.")


def _partial(scores: torch.Tensor, v: torch.Tensor):
    """Attention over one split of the keys: (softmax(scores) @ v, logsumexp(scores))."""
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def check_merge(merge) -> None:
    """`merge(o1, lse1, o2, lse2) -> (o, lse)`: two partial attention results over disjoint sets of keys,
    each normalised over its own keys, with lse = log(sum(exp(scores))) in natural log; o: (heads, d), lse: (heads,)."""
    heads, d, n_keys = 3, 16, 100
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(heads, d, generator=gen)
    keys, v = torch.randn(n_keys, d, generator=gen), torch.randn(n_keys, d, generator=gen)
    first = merge(*_partial(q @ keys[:50].T, v[:50]), *_partial(q @ keys[50:].T, v[50:]))
    if unanswered(first, "merge"):
        return
    assert isinstance(first, tuple) and len(first) == 2, "return (o, lse)"
    for scale in (0.25, 40.0):                           # 40: log-sum-exps of several hundred; e^lse overflows
        scores = (q @ keys.T) * scale                     # (heads, n_keys)
        want_o, want_lse = _partial(scores, v)
        for cut in (37, 1, 99):                          # uneven splits, down to a single key
            (o1, lse1), (o2, lse2) = _partial(scores[:, :cut], v[:cut]), _partial(scores[:, cut:], v[cut:])
            o, lse = merge(o1, lse1, o2, lse2)
            where = f"scores of size ~{scale:g}, keys split {cut} + {n_keys - cut}"
            assert o.shape == (heads, d) and lse.shape == (heads,), (
                f"{where}: expected o {(heads, d)} and lse {(heads,)}, got {tuple(o.shape)} and {tuple(lse.shape)}")
            assert torch.isfinite(o).all() and torch.isfinite(lse).all(), (
                f"{where}: inf or nan: exp(lse) overflowed. Subtract the larger lse first (or use torch.logaddexp)")
            assert torch.allclose(lse, want_lse, rtol=1e-5, atol=1e-5), (
                f"{where}: lse should be the log-sum-exp over all keys: log(exp(lse1) + exp(lse2))")
            right = torch.allclose(o, want_o, rtol=1e-5, atol=1e-5)
            if not right and torch.allclose(o, (o1 + o2) / 2):
                raise AssertionError(f"{where}: that is the plain average of o1 and o2; each must be weighted by its "
                                     f"share of the softmax denominator, exp(lse_i - lse)")
            assert right, (
                f"{where}: o is not softmax(all scores) @ v: o = exp(lse1 - lse) * o1 + exp(lse2 - lse) * o2")
        # Three splits, merged two at a time: the result must not depend on how the keys were split.
        a, b, c = (_partial(scores[:, s], v[s]) for s in (slice(0, 20), slice(20, 70), slice(70, None)))
        o, lse = merge(*merge(*a, *b), *c)
        same = torch.allclose(o, want_o, rtol=1e-5, atol=1e-5) and torch.allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
        assert same, (
            f"scores of size ~{scale:g}: merging three splits, (a + b) + c, gives a different result")
    print("Correct: merged partials equal attention over all keys, for uneven and three-way splits, "
          "also where exp(lse) would overflow fp32.")
