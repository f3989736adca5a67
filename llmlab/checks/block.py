"""Checks for the exercises of notebooks/04_transformer_block.ipynb.

Expected answers come from the model file itself (the byte size of every tensor, as the `gguf`
library reads it) and from running llmlab's blocks one by one, never from a stored number.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch

from llmlab.model import rope_cos_sin

from . import unanswered


def file_bytes_and_weights(path: Path) -> tuple[int, int]:
    """Bytes of tensor data in the GGUF file, and the number of weights they hold."""
    tensors = gguf.GGUFReader(path).tensors
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)


def check_file_bytes(answer, path: Path) -> None:
    """`answer`: bytes of the model's tensor data in the GGUF file at `path`, predicted from the
    parameter counts and the block formats (Q4_1: 20 bytes per 32 weights, Q8_0: 34, F32: 4 each)."""
    if unanswered(answer, "file_bytes"):
        return
    measured, n_weights = file_bytes_and_weights(path)
    assert answer == measured, (
        f"{answer:,} bytes is {answer / measured - 1:+.1%} off. Per format: the attention and MLP matrices "
        f"are Q4_1 (32 weights in 20 bytes: 16 bytes of 4-bit values + a 2-byte scale and a 2-byte minimum), "
        f"the embedding is Q8_0 (32 weights in 34 bytes: 32 bytes + a 2-byte scale), the norms are F32 "
        f"(4 bytes each); the tied head is stored once")
    print(f"Correct: {measured / 2**20:.1f} MiB of tensor data in the file, "
          f"{8 * measured / n_weights:.2f} bits per weight on average.")


@torch.inference_mode()
def lens_top_tokens(llm, ids: list[int]) -> list[int]:
    """The logit lens's top token for the last position after each block (index 0 = after block 1),
    computed by running the blocks one at a time rather than with hooks."""
    model = llm.model
    tokens = torch.tensor([ids], device=llm.device)
    x = model.embed(tokens)
    cos, sin = rope_cos_sin(torch.arange(len(ids), device=llm.device), llm.config.head_dim,
                            llm.config.rope_theta, x.dtype)
    tops = []
    for i, block in enumerate(model.layers):
        x = block(x, cos, sin, i, 0, None)
        tops.append(int(model.head(model.norm(x[:, -1])).argmax()))
    return tops


def check_lens_layer(answer, llm, prompt: str) -> None:
    """`answer`: the first block (counted from 1) after which the logit lens's top token for the last
    position of `prompt` is the model's final prediction."""
    if unanswered(answer, "first_layer"):
        return
    tops = lens_top_tokens(llm, llm.tokenizer.encode(prompt))
    final = tops[-1]
    expected = tops.index(final) + 1
    n = len(tops)
    assert isinstance(answer, int) and 1 <= answer <= n, f"give a block number from 1 to {n}, got {answer!r}"
    name = llm.tokenizer.decode
    assert answer != expected - 1, (
        f"off by one: count blocks from 1 (the output of m.model.layers[0] is block 1), "
        f"or check that you read the lens after block {answer}, not before it")
    assert tops[answer - 1] == final, (
        f"after block {answer} the lens's top token is {name([tops[answer - 1]])!r}, "
        f"not the final prediction {name([final])!r}")
    assert answer == expected, (
        f"after block {answer} the lens does rank {name([final])!r} first, but an earlier block already does")
    print(f"Correct: {name([final])!r} first tops the lens after block {expected} of {n}.")
