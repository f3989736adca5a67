"""Checks for the exercises of notebooks/11_triton_kernels.ipynb.

Each check launches the reader's Triton kernel (natively on a GPU, through Triton's interpreter on a
CPU) on sizes that are not multiples of the block, compares it with the same computation in PyTorch,
and surrounds every buffer with sentinel values so that an unmasked load or store shows up: the
interpreter does not detect out-of-bounds accesses, it reads and writes whatever memory follows.
The attention-softmax kernel runs on the real model's scores, layer by layer, and `locate` names the
first layer, head and query position where its weights leave the engine's.
"""

from __future__ import annotations

import torch

import llmlab.kernels  # noqa: F401 -- before triton: `import llmlab` switches on its interpreter when there is no GPU
import triton

from .. import probe
from ..corpus import prompt_ids
from ..kernels.int4_gemv import int4_matmul_reference
from ..quant.packing import pack_int4
from ..quant.quantize import quantize_asymmetric
from . import check, unanswered
from .locate import Step, locate

SENTINEL = 12345.0      # what the padding after `out` holds; a store past the end overwrites it


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _padded(values: torch.Tensor, pad: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a view holding `values`, the whole buffer): `pad` elements of `fill` follow the view in memory."""
    buffer = torch.full((values.numel() + pad,), fill, dtype=values.dtype, device=values.device)
    buffer[:values.numel()] = values.flatten()
    return buffer[:values.numel()].view(values.shape), buffer


@check
def check_scaled_add(scaled_add_kernel) -> None:
    """`scaled_add_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK)`: out = a * x + y, launched on cdiv(n, BLOCK) programs."""
    if unanswered(scaled_add_kernel, "scaled_add_kernel"):
        return
    device = _device()
    gen = torch.Generator().manual_seed(11)
    cases = [(1000, 256, -0.75), (4099, 1024, 3.5), (1, 64, 2.0)]     # n, BLOCK, a: none a multiple of BLOCK
    for n, block, a in cases:
        x, x_buffer = _padded(torch.randn(n, generator=gen).to(device), block, float("nan"))
        y, _ = _padded(torch.randn(n, generator=gen).to(device), block, float("nan"))
        out, out_buffer = _padded(torch.zeros(n, device=device), block, SENTINEL)
        scaled_add_kernel[(triton.cdiv(n, block),)](x, y, out, a, n, BLOCK=block)
        where = f"n = {n}, BLOCK = {block}, a = {a}"
        assert (out_buffer[n:] == SENTINEL).all(), (
            f"{where}: the kernel wrote past the end of out. The last program's offsets run beyond n: "
            f"store with mask=offsets < n")
        expected = a * x + y
        wrong = not torch.allclose(out, expected, rtol=1e-6, atol=1e-6)
        if wrong and torch.allclose(out, x + y):
            raise AssertionError(f"{where}: got x + y; multiply x by a")
        tail = (n // block) * block                                   # the first element of the masked program
        head_right = tail > 0 and torch.allclose(out[:tail], expected[:tail])
        if wrong and head_right and not torch.allclose(out[tail:], expected[tail:]):
            raise AssertionError(f"{where}: right up to element {tail}, wrong after it: the last program, the "
                                 f"one that runs past n, must still compute its first {n - tail} lanes")
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{where}: out differs from a * x + y\n{m}")
    print(f"Correct: a * x + y for n = {', '.join(str(n) for n, _, _ in cases)} (none a multiple of BLOCK), "
          f"nothing written past the end.")


@check
def check_bias_relu(bias_relu_kernel) -> None:
    """`bias_relu_kernel(x_ptr, bias_ptr, out_ptr, n_cols, BLOCK)`: out = relu(x + bias), one program per row,
    BLOCK = next_power_of_2(n_cols)."""
    if unanswered(bias_relu_kernel, "bias_relu_kernel"):
        return
    device = _device()
    gen = torch.Generator().manual_seed(12)
    shapes = [(3, 100), (4, 577), (1, 1), (2, 64)]
    for rows, n_cols in shapes:
        block = triton.next_power_of_2(n_cols)
        x, _ = _padded(torch.randn(rows, n_cols, generator=gen).to(device), block, float("nan"))
        bias, _ = _padded(torch.randn(n_cols, generator=gen).to(device), block, float("nan"))
        out, out_buffer = _padded(torch.zeros(rows, n_cols, device=device), block, SENTINEL)
        bias_relu_kernel[(rows,)](x, bias, out, n_cols, BLOCK=block)
        where = f"x of shape ({rows}, {n_cols}), BLOCK = {block}"
        assert (out_buffer[rows * n_cols:] == SENTINEL).all(), (
            f"{where}: the kernel wrote past the end of out: the lanes from n_cols to BLOCK are padding, "
            f"store with mask=cols < n_cols")
        expected = torch.relu(x + bias)
        wrong = not torch.allclose(out, expected, rtol=1e-6, atol=1e-6)
        if wrong and torch.allclose(out, torch.relu(x)):
            raise AssertionError(f"{where}: got relu(x): add the bias (one value per column) before the ReLU")
        if wrong and torch.allclose(out, x + bias):
            raise AssertionError(f"{where}: got x + bias: negative values must become 0 (tl.maximum(h, 0.0))")
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{where}: out differs from relu(x + bias)\n{m}")
    rows, n_cols = 4096, 4096
    # unfused: the add reads x and bias, writes h; the ReLU reads h, writes out
    unfused = (rows * n_cols + n_cols) + rows * n_cols + rows * n_cols + rows * n_cols
    fused = rows * n_cols + n_cols + rows * n_cols
    print(f"Correct on shapes {shapes}. For a {rows} x {n_cols} x, torch.relu(x + bias) moves {unfused:,} values, "
          f"the fused kernel {fused:,}: {unfused / fused:.1f}x fewer.")


N_TOKENS = 24           # BLOCK = 32: 8 padding lanes a row; 9 x 24 programs a layer keep the interpreter quick
SHARPER = 20            # the stress case: scores 20x larger reach ~250, and e^250 overflows fp32 (max ~e^88)


@torch.inference_mode()
def _real_scores(llm, layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(scores, weights) of each of `layers` on N_TOKENS of Hamlet, from one forward pass: q k^T unscaled
    (n_heads, seq, seq), and the engine's attention weights softmax(q k^T / sqrt(d) + M) from llmlab.probe."""
    inputs = probe.attention_inputs(llm, prompt_ids(llm.tokenizer, N_TOKENS))
    pairs = []
    for layer in layers:
        q, k, _ = probe.project_qkv(llm.model.layers[layer].attention, *inputs[layer])
        scores = q @ k.repeat_interleave(q.shape[0] // k.shape[0], 0).transpose(-2, -1)
        pairs.append((scores, probe.weights_from_qk(q, k)))
    return pairs


def _causal_softmax(scores: torch.Tensor, scale: float, causal: bool = True, diagonal: int = 0,
                    subtract_max: bool = True) -> torch.Tensor:
    """softmax over keys of scale * scores, keys j > i + diagonal at -inf if causal (the mistakes' variants:
    no mask, the wrong diagonal, no max subtracted)."""
    seq = scores.shape[-1]
    scaled = scores * scale
    if causal:
        visible = torch.ones(seq, seq, dtype=torch.bool, device=scores.device).tril(diagonal)
        scaled = scaled.masked_fill(~visible, float("-inf"))
    if subtract_max:
        return torch.softmax(scaled, dim=-1)
    e = torch.exp(scaled)
    return e / e.sum(dim=-1, keepdim=True)


def _run_attention_softmax(kernel, scores: torch.Tensor, scale: float) -> torch.Tensor:
    """The reader's kernel on scores (heads, seq, seq), one program per (head, query); out starts as NaN so
    that every entry the kernel leaves unwritten shows. A write past the end of out fails the check."""
    heads, seq, _ = scores.shape
    out, out_buffer = _padded(torch.full_like(scores, float("nan")), seq, SENTINEL)
    kernel[(heads * seq,)](scores.contiguous(), out, seq, scale, BLOCK=triton.next_power_of_2(seq))
    assert (out_buffer[scores.numel():] == SENTINEL).all(), (
        "the kernel wrote past the end of out: lanes from seq to BLOCK are padding, store with mask=keys < seq")
    return out


def _softmax_hint(got: torch.Tensor, scores: torch.Tensor, scale: float) -> str:
    """What a wrong `got` has in common with the usual mistakes (no advice names the missing code)."""
    def matches(wrong):     # fp32 softmaxes computed in another order agree far closer than this
        return torch.allclose(got, wrong, rtol=1e-5, atol=1e-6, equal_nan=True)

    right = _causal_softmax(scores, scale)
    after_query = ~torch.ones(right.shape[-1], right.shape[-1], dtype=torch.bool, device=got.device).tril()
    if matches(_causal_softmax(scores, scale, diagonal=-1)):
        return "Query 0 got no key at all (nan): a query sees the keys up to and including its own position."
    if matches(_causal_softmax(scores, 1.0)):
        return "These are the weights of the unscaled scores: multiply them by scale first."
    if matches(_causal_softmax(scores, scale, causal=False)):
        return "Every key got a weight: a key after the query must count as -inf, in the max and in the sum."
    if matches(_causal_softmax(scores, scale, subtract_max=False)):
        return "inf or nan: exp overflowed. Subtract the row's max before exp, as the softmax kernel does."
    if matches(torch.where(after_query, got, right)):
        return "Right where the key is visible; the keys after the query must be stored too, as weight 0."
    return "Per row: scale, the keys after the query to -inf, then the softmax of section 3.1."


@check
def check_attention_softmax(attention_softmax_kernel, llm) -> None:
    """`attention_softmax_kernel(scores_ptr, out_ptr, seq, scale, BLOCK)`: for scores (heads, seq, seq) fp32,
    contiguous, out[h, i, j] = softmax over j of scale * scores[h, i, j], keys j > i masked: one program per
    (head, query) row, launched on (heads * seq,) programs with BLOCK = next_power_of_2(seq).

    Run on the real unscaled scores q k^T of three layers, compared with the engine's attention weights
    (llmlab.probe): `locate` names the first layer, head and query position that differ, and draws the
    error. Then on the last layer's first head made 20x sharper, where exp overflows unless the max is
    subtracted.
    """
    if unanswered(attention_softmax_kernel, "attention_softmax_kernel"):
        return
    n_layers, scale = llm.config.n_layers, 1 / llm.config.head_dim ** 0.5
    layers = (0, n_layers // 3, n_layers - 1)
    dims = ("head", "query position", "key position")

    def steps():
        for layer, (scores, weights) in zip(layers, _real_scores(llm, layers)):
            # copies: plain tensors (not inference ones) on the kernels' device, whichever the model is on
            scores, weights = scores.to(_device(), copy=True), weights.to(_device(), copy=True)
            got = _run_attention_softmax(attention_softmax_kernel, scores, scale)
            yield Step("attention weights", got, weights, dims, layer=layer, hint=_softmax_hint(got, scores, scale))
        sharp = scores[:1] * SHARPER
        got = _run_attention_softmax(attention_softmax_kernel, sharp, scale)
        yield Step(f"attention weights of head 0, scores {SHARPER}x sharper", got, _causal_softmax(sharp, scale),
                   dims, layer=layers[-1], hint=_softmax_hint(got, sharp, scale))

    locate(steps())
    print(f"Correct: the attention weights of layers {', '.join(map(str, layers))} ({llm.config.n_heads} heads, "
          f"{N_TOKENS} tokens) equal the engine's, also where the scores are {SHARPER}x sharper.")


@check
def check_int4_dot(int4_dot, llm):
    """int4_dot(q, scales, offsets, x, group_size) -> y (N,) = W x, W[n, k] = q[n, k] scales[n, g] + offsets[n, g],
    on the int4 codes of layer 15's down projection and its input at the last of 16 real tokens, against llmlab's
    dequantized matmul: one term at a time, so that a mistake shows in which."""
    if unanswered(int4_dot, "int4_dot"):
        return
    linear, group = llm.model.layers[15].mlp.w_down, 128
    seen = {}
    hook = linear.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        llm.logits(prompt_ids(llm.tokenizer, 16))
    hook.remove()
    x = seen["x"][0, -1:]
    q, scales, offsets = quantize_asymmetric(linear.weight.detach(), bits=4, per=group)
    ones, zeros = torch.ones_like(scales), torch.zeros_like(offsets)
    cases = [("scales 1 and offsets 0 (W = q)", ones, zeros,
              "y[n] is the sum over every column k of q[n, k] * x[k]"),
             ("the real scales, offsets 0", scales, zeros,
              "each group's sum of q x is multiplied by that group's scale: scales[n, g] belongs to columns "
              "g * G to (g + 1) * G - 1"),
             ("the real scales and offsets", scales, offsets,
              "each group adds its offset times the sum of x over that group's columns")]
    for where, s, o, hint in cases:
        got = int4_dot(q, s, o, x[0], group)
        expected = int4_matmul_reference(x, pack_int4(q), s, o, group)[0]
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape, (
            f"int4_dot should return a tensor of shape {tuple(expected.shape)} (one value per output row); got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
        error = ((got.float() - expected).abs().max() / expected.abs().max()).item()
        assert error < 1e-5, f"with {where}, y is off by {error:.1e} of its largest value: {hint}."
    print(f"Correct: y = W x from the codes of a {q.shape[0]} x {q.shape[1]} layer in groups of {group}, "
          f"within 1e-5 of the dequantized matmul, without forming W.")
