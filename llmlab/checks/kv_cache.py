"""Checks for the exercises of notebooks/06_kv_caching.ipynb.

Expected answers come from caches llmlab really allocates (on PyTorch's meta device, which records
shapes and bytes without memory) and from `KVCache.update` itself inside the real model, never from a
stored number.
"""

from __future__ import annotations

import torch

from llmlab.config import ModelConfig
from llmlab.kv_cache import KVCache

from . import check, unanswered
from .locate import Step, locate


def llama3_70b_config() -> ModelConfig:
    """Llama-3-70B's shape: 80 layers, 64 query heads, 8 KV heads of 128 dimensions."""
    return ModelConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       ffn_dim=28672, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False)


@check
def check_70b_kv_bytes(answer, seq_len: int = 8192, batch: int = 1) -> None:
    """`answer`: bytes of Llama-3-70B's bf16 KV cache for `batch` sequences of `seq_len` tokens."""
    if unanswered(answer, "kv_bytes_70b"):
        return
    config = llama3_70b_config()
    expected = KVCache(config, seq_len, batch, dtype=torch.bfloat16, device="meta").nbytes
    assert answer != expected // 2, "that is the keys only (or the values only): the cache stores both"
    assert answer != expected * 2, "bf16 is 2 bytes per value, not 4"
    assert answer != expected * config.n_heads // config.n_kv_heads, (
        "that counts all 64 query heads: with grouped-query attention only the 8 KV heads are cached")
    assert answer == expected, (
        f"{answer:,} is not right: 2 (K and V) × layers × KV heads × head_dim × tokens × batch × 2 bytes")
    print(f"Correct: {expected / 2**30:.2f} GiB per {seq_len:,}-token sequence, "
          f"{expected // seq_len // 1024} KiB per token.")


# A prefill of 10 tokens, two decode steps, then a chunk of 3 (as a chunked prefill appends): every
# shape of append a cache sees. 16 slots for 15 tokens, so returning the whole buffer is wrong.
APPENDS = (10, 1, 1, 3)
MAX_LEN = 16
TEXT = "Fair is foul, and foul is fair: Hover through the fog and filthy air. When shall we three meet again"
DIMS = ("sequence", "KV head", "position", "channel")


class _TeacherForced(KVCache):
    """The engine's own cache, which the model reads; each update also hands the same keys and values
    to the learner's append_kv, on buffers of its own, and keeps both answers. Every layer thus gets
    the engine's inputs, so a mistake shows at the layer and step that makes it, not in all after it."""

    def __init__(self, config, append_kv):
        super().__init__(config, MAX_LEN, batch=2)
        self.learner = KVCache(config, MAX_LEN, batch=2)        # the learner's buffers, written by append_kv
        self.append_kv = append_kv
        self.steps: list[Step] = []
        self.views: list[bool] = []

    def update(self, layer, start_pos, k, v):
        want_k, want_v = super().update(layer, start_pos, k, v)
        k_buf, v_buf = self.learner.keys[layer], self.learner.values[layer]
        got = self.append_kv(k_buf, v_buf, start_pos, k.clone(), v.clone())
        assert isinstance(got, (tuple, list)) and len(got) == 2, (
            f"append_kv should return two tensors, (keys, values), got {type(got).__name__}")
        got_k, got_v = got
        what = f"appending {k.shape[2]} at position {start_pos}"
        returned = ("write k, v at positions start_pos .. start_pos+new-1 (dimension 2) and return positions "
                    "0 .. start_pos+new-1 of the buffers")
        stored = ("k_buf and v_buf must hold every position written so far, each at its own place: write "
                  "into them in place (k_buf[:, :, a:b] = k), along dimension 2")
        self.steps += [Step(f"keys returned, {what}", _copy(got_k), want_k.clone(), DIMS, layer, returned),
                       Step(f"values returned, {what}", _copy(got_v), want_v.clone(), DIMS, layer, returned),
                       Step(f"keys in k_buf, {what}", k_buf.clone(), self.keys[layer].clone(), DIMS, layer, stored),
                       Step(f"values in v_buf, {what}", v_buf.clone(), self.values[layer].clone(), DIMS, layer, stored)]
        self.views.append(all(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                              for t, buf in ((got_k, k_buf), (got_v, v_buf))))
        return want_k, want_v


class _Learners(KVCache):
    """A cache whose update is the learner's append_kv, for the model to read from."""

    def __init__(self, config, append_kv):
        super().__init__(config, MAX_LEN, batch=2)
        self.append_kv = append_kv

    def update(self, layer, start_pos, k, v):
        return self.append_kv(self.keys[layer], self.values[layer], start_pos, k, v)


def _copy(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def _run(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The model over `tokens` in APPENDS' pieces through `cache`; the logits of the last piece."""
    start = 0
    for new in APPENDS:
        logits = model(tokens[:, start:start + new], start_pos=start, cache=cache, last_only=True)
        start += new
    return logits


@check
def check_append(append_kv, llm) -> None:
    """`append_kv(k_buf, v_buf, start_pos, k, v)`: k_buf, v_buf float32 tensors (batch, kv_heads, max_len,
    head_dim); start_pos an int; k, v tensors (batch, kv_heads, new, head_dim). Write k, v at positions
    start_pos .. start_pos+new-1 in place and return (keys, values) of positions 0 .. start_pos+new-1,
    views of the buffers: one layer of KVCache.update. Run inside the real model for all its layers."""
    config = llm.config
    probe = torch.zeros(1, config.n_kv_heads, 2, config.head_dim)
    if unanswered(append_kv(probe, probe.clone(), 0, probe[:, :, :1], probe[:, :, :1]), "append_kv"):
        return
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > sum(APPENDS), "the check's text is too short for its appends"
    tokens = torch.tensor([ids[:sum(APPENDS)], ids[1:sum(APPENDS) + 1]])        # two sequences
    with torch.no_grad():
        spy = _TeacherForced(config, append_kv)
        reference = _run(llm.model, tokens, spy)
        locate(spy.steps)
        assert all(spy.views), ("the keys and values you return are copies: return slices of k_buf and v_buf "
                                "(views), so that attention reads the cache itself and nothing is copied per step")
        yours = _run(llm.model, tokens, _Learners(config, append_kv))
    assert torch.equal(yours, reference), "the model's logits through your cache differ from the engine's"
    print(f"Correct: in all {config.n_layers} layers, over a prefill of {APPENDS[0]}, two decode steps and a chunk "
          f"of {APPENDS[-1]}, the same keys and values as KVCache.update, written in place and returned as "
          f"views; the model's logits through your cache are the engine's, bit for bit.")
