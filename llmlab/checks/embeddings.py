"""Checks for the exercises of notebooks/02_embeddings_and_rope.ipynb.

Expected answers come from PyTorch's cosine similarity, from llmlab's RoPE (`rope_cos_sin`,
`apply_rope`, run on the real model's queries and keys) and from llmlab's GGUF row order
(`unpermute_qk`), never from a stored number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.gguf import unpermute_qk
from llmlab import probe
from llmlab.model import apply_rope, rope_cos_sin

from . import check, unanswered
from .locate import Step, locate


@check
def check_nearest_tokens(answer, table: torch.Tensor, token_id: int, k: int = 5) -> None:
    """`answer`: the ids of the k rows of `table` most cosine-similar to row `token_id`, itself excluded."""
    if unanswered(answer, "nearest_ids"):
        return
    got = [int(i) for i in answer]
    cosine = F.cosine_similarity(table, table[token_id][None], dim=-1)
    cosine[token_id] = -2.0                                       # below any cosine: exclude the token itself
    expected = torch.topk(cosine, k).indices.tolist()
    by_dot_product = torch.topk(table @ table[token_id], k + 1).indices.tolist()
    assert token_id not in got, "leave the token itself out: its cosine with itself is 1, the largest possible"
    assert len(got) == k, f"give {k} ids, you gave {len(got)}"
    assert set(got) != set(by_dot_product[:k]) and set(got) != set(by_dot_product[1:]), (
        "those are the largest dot products, which favour long vectors: divide each row by its length first")
    assert set(got) == set(expected), (
        f"expected the ids {sorted(expected)}, you gave {sorted(got)}: cosine(a, b) = a·b / (|a| |b|), "
        f"computed between the token's row and every row of the table")
    print(f"Correct: the {k} nearest tokens by cosine similarity.")


def adjacent_pairs_order(head_dim: int) -> torch.Tensor:
    """The order of one head's rows in llama.cpp's file: GGUF row r holds Hugging Face row order[r].
    Read off `unpermute_qk`, which maps the file's rows back to Hugging Face's."""
    file_row_of = torch.from_numpy(unpermute_qk(torch.arange(head_dim)[:, None].numpy(), n_heads=1))[:, 0]
    return torch.argsort(file_row_of)


@check
def check_rope_adjacent(rope_adjacent, config: ModelConfig) -> None:
    """`rope_adjacent(x, pos)`: RoPE on pairs of neighbours (x_0, x_1), (x_2, x_3), ... of a head vector x.

    It must be llmlab's rotate-half RoPE seen through the permutation that puts x_i next to x_{i+d/2}.
    """
    d = config.head_dim
    order = adjacent_pairs_order(d)
    x = torch.randn(d, generator=torch.Generator().manual_seed(2))
    # a function that still returns the placeholder None counts as unanswered
    if unanswered(rope_adjacent and rope_adjacent(x[order], 0), "rope_adjacent"):
        return
    for pos in (0, 1, 3, 100):
        cos, sin = rope_cos_sin(torch.tensor([pos]), d, config.rope_theta, torch.float32)
        expected = apply_rope(x, cos[0], sin[0])[order]
        got = rope_adjacent(x[order], pos)
        assert got.shape == (d,), f"expected a vector of shape ({d},), got {tuple(got.shape)}"
        if pos == 0:
            torch.testing.assert_close(got, x[order], msg="position 0 is a rotation by angle 0: x must come back unchanged")
        assert abs(got.norm() - x.norm()) < 1e-3, "a rotation keeps the length of x: check the signs of the sin terms"
        assert pos == 0 or not torch.allclose(got, apply_rope(x[order], cos[0], sin[0]), atol=1e-4), (
            "that rotates the halves (x[i], x[i + d/2]), as llmlab does: pair the neighbours (x[2i], x[2i+1]) instead")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=lambda m: (
            f"position {pos}: not the same rotation as llmlab's RoPE.\n{m}\nRotate pair i = (x[2i], x[2i+1]) by "
            f"the angle pos·θ_i, θ_i = base^(-2i/d): (a cos - b sin, a sin + b cos)"))
    print(f"Correct: rotating neighbours is llmlab's rotate-half RoPE, up to the permutation {order[:6].tolist()}...")


ROPE_HINT = ("RoPE(x, m)_i = x_i cos mθ_i - x_(i+d/2) sin mθ_i and RoPE(x, m)_(i+d/2) = x_i sin mθ_i + "
             "x_(i+d/2) cos mθ_i, with θ_i = base^(-2i/d) for i = 0 .. d/2 - 1. At position 0 every angle is 0 "
             "and x must come back unchanged: if position 0 is already wrong, x is changed where it should not "
             "be; if the first wrong position is 1 or later, the rotation itself is off (which coordinates "
             "pair up, the signs, or θ_i).")


def rope_steps(rope, llm, ids: list[int]):
    """For every layer, the learner's `rope` and llmlab's `apply_rope` on that layer's real queries and
    keys before RoPE (the engine's, so that a mistake shows where it is made)."""
    positions = torch.arange(len(ids), device=llm.device)
    for layer, (x, cos, sin) in enumerate(probe.attention_inputs(llm, ids)):
        q, k, _ = probe.project_qkv(llm.model.layers[layer].attention, x)   # (heads, seq, head_dim), no RoPE
        for name, before in (("q after RoPE", q), ("k after RoPE", k)):
            yield Step(name, rope(before.clone(), positions), apply_rope(before, cos, sin),
                       ("head", "position", "channel"), layer, ROPE_HINT)


@check
def check_rope(rope, llm, prompt: str) -> None:
    """`rope(x, positions)`: x (heads, seq, head_dim), positions (seq,) int64 -> x rotated, same shape.
    Compared with llmlab's `apply_rope` on every layer's real queries and keys for `prompt`."""
    ids = llm.tokenizer.encode(prompt)
    x = torch.zeros(1, len(ids), llm.config.head_dim)
    # a function that still returns the placeholder None counts as unanswered
    if unanswered(rope and rope(x, torch.arange(len(ids))), "rope"):
        return
    with torch.inference_mode():
        compared = locate(rope_steps(rope, llm, ids))
    print(f"Correct: your RoPE equals llmlab's on the queries and keys of all {llm.config.n_layers} layers "
          f"({compared} tensors, {len(ids)} positions).")


@check
def check_slow_pairs(answer, config: ModelConfig) -> None:
    """`answer`: how many RoPE pairs never turn a full circle within the model's context."""
    if unanswered(answer, "slow_pairs"):
        return
    positions = torch.arange(config.max_seq_len)
    _, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, torch.float32)
    sin = sin[:, : config.head_dim // 2]
    # a pair completes a turn where its sine comes back from negative to non-negative
    turned = ((sin[:-1] < 0) & (sin[1:] >= 0)).any(dim=0)
    expected = int((~turned).sum())
    assert answer == expected, (
        f"{answer} is not right. Pair i turns by θ_i = base^(-2i/d) per token, so one full turn takes "
        f"2π/θ_i tokens (its wavelength); count the pairs whose wavelength is longer than "
        f"config.max_seq_len = {config.max_seq_len}")
    print(f"Correct: {expected} of the {config.head_dim // 2} pairs turn less than a full circle over "
          f"{config.max_seq_len} tokens.")
