"""Checks for the exercises of notebooks/11_triton_kernels.ipynb.

Each check launches the reader's Triton kernel (natively on a GPU, through Triton's interpreter on a
CPU) on sizes that are not multiples of the block, compares it with the same computation in PyTorch,
and surrounds every buffer with sentinel values so that an unmasked load or store shows up: the
interpreter does not detect out-of-bounds accesses, it reads and writes whatever memory follows.
"""

from __future__ import annotations

import torch

import llmlab.kernels  # noqa: F401 -- before triton: `import llmlab` switches on its interpreter when there is no GPU
import triton

from . import unanswered

SENTINEL = 12345.0      # what the padding after `out` holds; a store past the end overwrites it


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _padded(values: torch.Tensor, pad: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a view holding `values`, the whole buffer): `pad` elements of `fill` follow the view in memory."""
    buffer = torch.full((values.numel() + pad,), fill, dtype=values.dtype, device=values.device)
    buffer[:values.numel()] = values.flatten()
    return buffer[:values.numel()].view(values.shape), buffer


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
