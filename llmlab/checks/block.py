"""Checks for the exercises of notebooks/04_transformer_block.ipynb.

Expected answers come from the model file itself (the byte size of every tensor, as the `gguf`
library reads it) and from running llmlab's blocks one by one, never from a stored number.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch

from llmlab.model import rope_cos_sin

from . import check, unanswered
from .locate import Step, locate


def file_bytes_and_weights(path: Path) -> tuple[int, int]:
    """Bytes of tensor data in the GGUF file, and the number of weights they hold."""
    tensors = gguf.GGUFReader(path).tensors
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)


@check
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


@check
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


# The four pieces a block wires together, in the order the engine calls them, with what each one must receive.
PIECES = {
    "attn_norm": ("input of attn_norm", "the block's input x goes into the first RMSNorm"),
    "attention": ("input of attention", "attention reads the normalised x, RMSNorm_1(x)"),
    "mlp_norm": ("input of mlp_norm", "the second RMSNorm reads the residual stream h = x + attention(...): "
                 "add the attention's output to x, not to its normalised copy"),
    "mlp": ("input of mlp", "the MLP reads the normalised h, RMSNorm_2(h)"),
}
OUTPUT_HINT = "the block returns h + mlp(...): the MLP's output added to the residual stream h."


class Recorder:
    """One of the engine's pieces, handed to the learner's block: it runs the piece and remembers its inputs."""

    def __init__(self, piece):
        self.piece, self.inputs = piece, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.piece(x)


def engine_pieces(llm, layer: int, cos, sin) -> dict:
    """Layer `layer`'s RMSNorms, attention and MLP as functions of a (seq, dim) tensor."""
    block = llm.model.layers[layer]
    return {"attn_norm": block.attn_norm,
            "attention": lambda x: block.attention(x[None], cos, sin, layer, 0, None)[0],
            "mlp_norm": block.mlp_norm, "mlp": block.mlp}


def block_steps(block_forward, llm, ids: list[int]):
    """For every layer: what the learner's block hands each piece, and what it returns, against the engine
    on the engine's own residual stream entering that layer."""
    c = llm.config
    x = llm.model.embed(torch.tensor(ids, device=llm.device))                       # (seq, dim)
    cos, sin = rope_cos_sin(torch.arange(len(ids), device=llm.device), c.head_dim, c.rope_theta, x.dtype)
    for layer, block in enumerate(llm.model.layers):
        pieces = engine_pieces(llm, layer, cos, sin)
        h = x + pieces["attention"](pieces["attn_norm"](x))
        expected = {"attn_norm": x, "attention": pieces["attn_norm"](x), "mlp_norm": h, "mlp": pieces["mlp_norm"](h)}
        recorders = {name: Recorder(piece) for name, piece in pieces.items()}
        got = block_forward(x.clone(), **recorders)
        for name, (operation, hint) in PIECES.items():
            calls = len(recorders[name].inputs)
            assert calls == 1, f"layer {layer}: your block calls {name} {calls} times; a block calls each piece once"
            yield Step(operation, recorders[name].inputs[0], expected[name], ("position", "channel"), layer, hint)
        x = block(x[None], cos, sin, layer, 0, None)[0]
        yield Step("output", got, x, ("position", "channel"), layer, OUTPUT_HINT)


@check
def check_block(block_forward, llm, prompt: str) -> None:
    """`block_forward(x, attn_norm, attention, mlp_norm, mlp)`: x (seq, dim), each piece a function from a
    (seq, dim) tensor to a (seq, dim) tensor -> the block's output (seq, dim). Run with the engine's
    pieces of every layer on the real residual stream of `prompt`, then as the whole model."""
    x = torch.zeros(2, llm.config.dim)
    if unanswered(block_forward(x, *[lambda t: t] * 4), "block_forward"):   # the placeholder returns None
        return
    ids = llm.tokenizer.encode(prompt)
    with torch.inference_mode():
        compared = locate(block_steps(block_forward, llm, ids))
        stream = llm.model.embed(torch.tensor(ids, device=llm.device))
        cos, sin = rope_cos_sin(torch.arange(len(ids), device=llm.device), llm.config.head_dim,
                                llm.config.rope_theta, stream.dtype)
        for layer in range(llm.config.n_layers):
            stream = block_forward(stream, **engine_pieces(llm, layer, cos, sin))
        logits = llm.model.head(llm.model.norm(stream))
    reference = llm.logits(ids)
    same_top = bool((logits.argmax(-1) == reference.argmax(-1)).all())
    print(f"Correct: your block hands every piece what the engine does, in all {llm.config.n_layers} layers "
          f"({compared} tensors compared). {llm.config.n_layers} of your blocks in a row give "
          f"{'the same' if same_top else 'a different'} top token as llmlab at every one of the "
          f"{len(ids)} positions; next token {llm.tokenizer.decode([int(logits[-1].argmax())])!r}.")
