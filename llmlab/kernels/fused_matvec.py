"""Matrix-vector products with their neighbours fused in: the decode step's linear layers, one kernel each.

At decode a linear layer multiplies ONE vector per sequence by a weight matrix: y = W x, W (N, K). Each
weight is read once and used for two flops, so the product is bound by reading W, and on a small model
by launching the kernel at all. The operations around it (a norm before, an activation or a residual
add after) each cost a kernel of their own in the plain path; here they ride along for free:

    NORM      x <- x / sqrt(mean(x^2) + eps) * g     RMSNorm as the prologue: every program reads the whole
                                                    x (K values, a few KB, from L2) and normalises it itself
    GLU       y_n = silu(W_gate x)_n * (W_up x)_n    W is [W_gate; W_up]: a program takes rows n of both
    RESIDUAL  y <- y + r                            the block's residual add as the epilogue

One program per (block of BLOCK_N output rows, sequence); it walks K in BLOCK_K steps, accumulating
W[rows, k:k+BLOCK_K] * x[k:k+BLOCK_K] in fp32. The output is rounded to the storage dtype once.
At batch 1 a small model's kernels are bound by latency, not bytes: each load that waits for another
costs a memory round trip (~1 us), so a program issues its loads without waiting where it can.
"""

import torch
import triton
import triton.language as tl

from . import dependent_launch


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the kernel before has finished and its writes are
    visible, then let the next kernel start its own weight loads."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def matvec_kernel(x_ptr, w_ptr, norm_ptr, residual_ptr, y_ptr, n_rows, n_cols, eps,
                  NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    block, seq = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < n_rows
    tile = rows[:, None].to(tl.int64) * n_cols + tl.arange(0, BLOCK_K)[None, :]
    x_ptr += seq * n_cols
    # Products are summed elementwise along the walk and reduced across the lanes once at the end.
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # The first weights are loaded before waiting for the kernel that writes x: no kernel writes weights.
    # Inside the walk, each step loads the next step's weights while it sums this one's.
    w, w_up, g = load_weights(w_ptr, norm_ptr, tile, 0, row_ok, n_rows, n_cols, NORM, GLU, BLOCK_K)
    wait_for_previous_kernel(PDL)
    for start in tl.range(0, n_cols, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if NORM:
            # W (x * g / rms) = (W (x * g)) / rms: the sum of squares is gathered on the same walk and
            # the division waits for the end, so x is read once and no load waits for the norm
            squares += x * x
            x = x * g.to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if GLU:
            acc_up += w_up.to(tl.float32) * x[None, :]
        w, w_up, g = load_weights(w_ptr, norm_ptr, tile, start + BLOCK_K, row_ok, n_rows, n_cols, NORM, GLU, BLOCK_K)
    y = tl.sum(acc, axis=1)
    scale = tl.rsqrt(tl.sum(squares, axis=0) / n_cols + eps) if NORM else 1.0
    y = y * scale
    if GLU:
        up = tl.sum(acc_up, axis=1) * scale
        y = y * tl.sigmoid(y) * up                 # silu(gate) * up
    if RESIDUAL:
        y += tl.load(residual_ptr + seq * n_rows + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
    tl.store(y_ptr + seq * n_rows + rows, y.to(y_ptr.dtype.element_ty), mask=rows < n_rows)


@triton.jit
def load_weights(w_ptr, norm_ptr, tile, start, row_ok, n_rows, n_cols, NORM: tl.constexpr, GLU: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The weight tile at columns start.., W_up's (n_rows rows further down) and the norm's weights, in
    their storage dtype (half the registers of fp32 while they wait); past the last column everything is
    masked: nothing is read."""
    cols = start + tl.arange(0, BLOCK_K)
    ok = row_ok & (cols[None, :] < n_cols)
    w = tl.load(w_ptr + tile + start, mask=ok, other=0.0)
    w_up = tl.load(w_ptr + n_rows * n_cols + tile + start, mask=ok, other=0.0) if GLU else w
    g = tl.load(norm_ptr + cols, mask=cols < n_cols, other=0.0) if NORM else cols
    return w, w_up, g


def launch_config(n_rows: int, n_cols: int, glu: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from a sweep on an H200 (bf16, each config replayed from a CUDA
    graph: python -m llmlab.bench.fused_sweep). Short rows (K <= 1024, a small model) are read in one
    load, not a chain of dependent ones; long rows in 512-wide steps. Few rows per program: a layer's
    products then spread over hundreds of programs, enough to keep every SM's loads in flight."""
    short = n_cols <= 1024
    if n_rows >= 16384 and not glu:                      # the LM head: programs aplenty at any BLOCK_N
        return 8, 256 if short else 512, 2
    if glu:
        return (2, triton.next_power_of_2(n_cols), 2) if short else (4, 1024, 4)
    return (2, triton.next_power_of_2(n_cols), 4) if short else (2, 512, 2)


def matvec(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
           glu: bool = False, residual: torch.Tensor | None = None, block_n: int | None = None,
           block_k: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x (batch, K) -> (batch, N): W x, with RMSNorm(x; norm, eps) first if `norm` is given, silu(gate) * up
    if `glu` (weight is [W_gate; W_up], 2N rows), and `residual` (batch, N) added last."""
    batch, n_cols = x.shape
    n_rows = weight.shape[0] // 2 if glu else weight.shape[0]
    if weight.shape[1] != n_cols or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"matvec takes contiguous x (batch, K) and W (N, K): x {tuple(x.shape)}, W {tuple(weight.shape)}")
    y = torch.empty(batch, n_rows, dtype=x.dtype, device=x.device)
    pdl = dependent_launch(x.device)
    default_n, default_k, default_warps = launch_config(n_rows, n_cols, glu)
    block_n, block_k, num_warps = block_n or default_n, block_k or default_k, num_warps or default_warps
    matvec_kernel[(triton.cdiv(n_rows, block_n), batch)](
        x, weight, norm if norm is not None else x, residual if residual is not None else y, y, n_rows, n_cols, eps,
        NORM=norm is not None, GLU=glu, RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    return y


def matvec_reference(x, weight, norm=None, eps=0.0, glu=False, residual=None):
    """The same in PyTorch ops, in fp32."""
    x = x.float()
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.float()
    y = x @ weight.float().T
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y if residual is None else y + residual.float()
