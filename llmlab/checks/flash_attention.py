"""Checks for the exercises of notebooks/12_flash_attention.ipynb.

Both checks first run the reader's function on the real queries, keys and values of three SmolLM2
layers (llmlab.probe), one tile or one split at a time, each time fed the exact state the previous
step should have left (teacher forcing): `locate` then names the first layer, key tile or split, head
and query position where the reader's numbers leave the expected ones, and draws the error. Expected
answers are independent PyTorch computations over all the keys seen so far at once (max, torch.softmax,
torch.logsumexp), never the streamed or merged quantities the exercise builds.

Then scores far larger than the real ones: those overflow exp in fp32 (e^89 > 3.4e38) unless the
running maximum is subtracted first, as FlashAttention must.
"""

from __future__ import annotations

import math

import torch

from .. import probe
from ..attention import causal_mask
from ..corpus import prompt_ids
from . import check, unanswered
from .locate import Step, locate

N_TOKENS = 56           # 56 positions in key tiles of 16: three full tiles and a last one of 8
TILE = 16
SPLITS = (0, 17, 40, 41, 56)    # decode's key splits: uneven, one of a single key


def _layers(llm) -> tuple[int, ...]:
    """The first, a middle and the last layer."""
    return 0, llm.config.n_layers // 3, llm.config.n_layers - 1


@torch.inference_mode()
def _real_qkv(llm, layers) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) of each of `layers` on N_TOKENS of Hamlet, from one forward pass; q (n_heads, seq, d) is
    scaled by 1/sqrt(d), so that q k^T are the scores; k, v (n_kv_heads, seq, d)."""
    inputs = probe.attention_inputs(llm, prompt_ids(llm.tokenizer, N_TOKENS))
    triples = []
    for layer in layers:
        q, k, v = probe.project_qkv(llm.model.layers[layer].attention, *inputs[layer])
        triples.append(tuple(t.clone() for t in (q / math.sqrt(q.shape[-1]), k, v)))
    return triples


def _state(scores: torch.Tensor, v: torch.Tensor, end: int):
    """(m, l, acc) after the keys [0, end), all at once: scores (rows, n_keys), some -inf; v (n_keys, d)."""
    rows, d = scores.shape[0], v.shape[1]
    if end == 0:
        return (torch.full((rows,), float("-inf"), device=v.device), torch.zeros(rows, device=v.device),
                torch.zeros(rows, d, device=v.device))
    s = scores[:, :end]
    m = s.max(dim=1).values
    p = torch.exp(s - m[:, None])
    return m, p.sum(dim=1), p @ v[:end]


def _expect_shapes(got, rows: int, d: int, where: str) -> None:
    assert isinstance(got, tuple) and len(got) == 3, "return the three running quantities: (m, l, acc)"
    m, l, acc = got
    assert all(isinstance(t, torch.Tensor) for t in got), f"{where}: m, l and acc should be tensors"
    assert m.shape == (rows,) and l.shape == (rows,) and acc.shape == (rows, d), (
        f"{where}: expected shapes m {(rows,)}, l {(rows,)}, acc {(rows, d)}; got "
        f"{tuple(m.shape)}, {tuple(l.shape)}, {tuple(acc.shape)}")


def _by_head(states, i: int, n_heads: int) -> torch.Tensor:
    """Quantity i of (m, l, acc) of every KV head's call, rows (group * seq, ...) each -> (n_heads, seq, ...)."""
    return torch.cat([state[i] for state in states]).reshape(n_heads, N_TOKENS, *states[0][i].shape[1:])


def _online_steps(online_update, llm):
    """For each layer and key tile, the Steps comparing the reader's (m, l, acc) with the expected ones.
    The GROUP query heads that share a KV head are the rows of one call, as in decode_attention_kernel."""
    for layer, (q, k, v) in zip(_layers(llm), _real_qkv(llm, _layers(llm))):
        visible = causal_mask(N_TOKENS, N_TOKENS, q.device)
        n_heads, n_kv_heads, d = q.shape[0], k.shape[0], q.shape[-1]
        group = n_heads // n_kv_heads
        # per KV head: scores (group * seq, seq) of its query heads, masked where the key is after the query
        scores = [(q[g * group:(g + 1) * group] @ k[g].T).masked_fill(~visible, float("-inf")).reshape(-1, N_TOKENS)
                  for g in range(n_kv_heads)]
        for tile, start in enumerate(range(0, N_TOKENS, TILE)):
            end = min(start + TILE, N_TOKENS)
            got, want = [], []
            for g in range(n_kv_heads):
                answer = online_update(*_state(scores[g], v[g], start), scores[g][:, start:end], v[g][start:end])
                _expect_shapes(answer, group * N_TOKENS, d, f"layer {layer}, key tile {tile}")
                got.append(answer)
                want.append(_state(scores[g], v[g], end))
            where = f"after key tile {tile} (keys {start}–{end - 1})"
            yield Step(f"running max m {where}", _by_head(got, 0, n_heads), _by_head(want, 0, n_heads),
                       ("head", "query position"), layer,
                       "m is the largest score seen so far: the old m or the tile's max, whichever is larger.")
            yield Step(f"running sum l {where}", _by_head(got, 1, n_heads), _by_head(want, 1, n_heads),
                       ("head", "query position"), layer,
                       "l is sum(exp(s - m)) over every key seen. When the max rises from m to m_new, what was "
                       "summed so far must be rescaled by exp(m - m_new) before the tile's exp(s - m_new) is added.")
            yield Step(f"accumulator acc {where}", _by_head(got, 2, n_heads), _by_head(want, 2, n_heads),
                       ("head", "query position", "channel"), layer,
                       "acc is rescaled by the same factor as l, then gets p @ v added, p = exp(s - m_new); "
                       "it stays a sum: no division by l until the very end.")


@check
def check_online_update(online_update, llm) -> None:
    """`online_update(m, l, acc, scores, v) -> (m, l, acc)`: one tile of the online softmax.

    m, l: (rows,) running max and running sum of exp(score - m); acc: (rows, d) running
    sum of exp(score - m) * v, unnormalised; scores: (rows, tile), -inf for a key after the query;
    v: (tile, d). All float32.
    """
    rows, d, tile = 4, 8, 16
    gen = torch.Generator().manual_seed(12)
    first = online_update(*_state(torch.zeros(rows, 0), torch.zeros(0, d), 0),
                          torch.randn(rows, tile, generator=gen), torch.randn(tile, d, generator=gen))
    if unanswered(first, "online_update"):
        return
    locate(_online_steps(online_update, llm))
    # Scores ~60: e^score overflows fp32 unless the max is subtracted. Streamed without teacher forcing.
    n_keys = 53
    scores, v = torch.randn(rows, n_keys, generator=gen) * 60, torch.randn(n_keys, d, generator=gen)
    m, l, acc = _state(scores, v, 0)
    for start in range(0, n_keys, tile):
        m, l, acc = online_update(m, l, acc, scores[:, start:start + tile], v[start:start + tile])
    where = f"scores of size ~60, {n_keys} keys in tiles of {tile}"
    _expect_shapes((m, l, acc), rows, d, where)
    assert torch.isfinite(l).all() and torch.isfinite(acc).all(), (
        f"{where}: l or acc is inf or nan: exp overflowed. Subtract the running max m before exp")
    torch.testing.assert_close(acc / l[:, None], torch.softmax(scores, dim=1) @ v, rtol=1e-5, atol=1e-5,
                               msg=lambda _: f"{where}: acc / l is not softmax(scores) @ v")
    print(f"Correct: tile by tile, m, l and acc equal the softmax of every key seen so far, on {N_TOKENS} "
          f"positions of layers {', '.join(map(str, _layers(llm)))}; also for scores whose exp would overflow fp32.")


def _partial(scores: torch.Tensor, v: torch.Tensor):
    """Attention over one split of the keys: (softmax(scores) @ v, logsumexp(scores)).
    scores (heads, n_keys); v (heads, n_keys, d), each head's values."""
    return (torch.softmax(scores, dim=-1)[:, None] @ v)[:, 0], torch.logsumexp(scores, dim=-1)


def _merge_steps(merge, llm):
    """For each layer and split after the first: the reader's merge of (everything before, this split),
    compared with attention over all those keys at once."""
    for layer, (q, k, v) in zip(_layers(llm), _real_qkv(llm, _layers(llm))):
        group = q.shape[0] // k.shape[0]
        # the newest token's query of every head, against all the keys: a decode step
        scores = torch.einsum("hd,hjd->hj", q[:, -1], k.repeat_interleave(group, 0))        # (heads, seq)
        values = v.repeat_interleave(group, 0)                                               # (heads, seq, d)
        for split in range(1, len(SPLITS) - 1):
            before, start, end = slice(0, SPLITS[split]), SPLITS[split], SPLITS[split + 1]
            answer = merge(*_partial(scores[:, before], values[:, before]),
                           *_partial(scores[:, start:end], values[:, start:end]))
            assert isinstance(answer, tuple) and len(answer) == 2, "return (o, lse)"
            o_want, lse_want = _partial(scores[:, :end], values[:, :end])
            where = f"merging keys 0–{start - 1} with split {split} (keys {start}–{end - 1})"
            yield Step(f"lse after {where}", answer[1], lse_want, ("head",), layer,
                       "lse is the log-sum-exp over all the keys: log(exp(lse1) + exp(lse2)).")
            yield Step(f"output after {where}", answer[0], o_want, ("head", "channel"), layer,
                       "Each partial output is normalised over its own keys: weight it by its share "
                       "exp(lse_i - lse) of the whole denominator.")


@check
def check_merge(merge, llm) -> None:
    """`merge(o1, lse1, o2, lse2) -> (o, lse)`: two partial attention results over disjoint sets of keys,
    each normalised over its own keys, with lse = log(sum(exp(scores))) in natural log; o: (heads, d), lse: (heads,).
    All float32."""
    heads, d, n_keys = 3, 16, 100
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(heads, d, generator=gen)
    keys, v = torch.randn(n_keys, d, generator=gen), torch.randn(heads, n_keys, d, generator=gen)
    first = merge(*_partial(q @ keys[:50].T, v[:, :50]), *_partial(q @ keys[50:].T, v[:, 50:]))
    if unanswered(first, "merge"):
        return
    locate(_merge_steps(merge, llm))
    # Scores ~40: log-sum-exps of several hundred, whose exp overflows fp32.
    scores = (q @ keys.T) * 40
    o, lse = merge(*_partial(scores[:, :37], v[:, :37]), *_partial(scores[:, 37:], v[:, 37:]))
    where = "scores of size ~40, keys split 37 + 63"
    assert torch.isfinite(o).all() and torch.isfinite(lse).all(), (
        f"{where}: inf or nan: exp(lse) overflowed. Subtract the larger lse first (or use torch.logaddexp)")
    o_want, lse_want = _partial(scores, v)
    assert torch.allclose(lse, lse_want, rtol=1e-5, atol=1e-5) and torch.allclose(o, o_want, rtol=1e-5, atol=1e-5), (
        f"{where}: o or lse differs from attention over all keys")
    print(f"Correct: merged split by split, the decode attention of layers {', '.join(map(str, _layers(llm)))} equals "
          f"attention over all keys at once; also where exp(lse) would overflow fp32.")
