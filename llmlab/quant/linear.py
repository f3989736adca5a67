"""Weight-only quantized linear layers, and `quantize_model`, which swaps them into a Transformer.

Weight-only: the weights are stored in 8 or 4 bits, the activations stay in floating point (bf16 by
default). Decoding one token reads every weight once, so fewer bytes per weight is fewer bytes to move
and a faster token, as long as the matmul reads the small weights directly instead of first writing out
a float copy of them. PyTorch's CPU kernels and the Triton int4 kernel do; the CUDA int8 path and fp8
upcast q to the activations' dtype first (correct, simple, and not faster than bf16 unless compiled):

           stored as (per output row n)                      CPU                              CUDA
Int8Linear  int8 q (N, K), scale (N,): W = q * scale          aten._weight_int8pack_mm         F.linear(x, q) * scale
Int4Linear  4-bit q (N, K/2 bytes), scale and offset           aten._weight_int4pack_mm_for_cpu llmlab.kernels.int4_gemv
            (N, K/group): W = q * scale + offset per group
Fp8Linear   float8_e4m3fn q (N, K), scale (N,): W = q * scale  F.linear(x, q) * scale           the same

PyTorch's CPU int8 and int4 kernels are fast only with bf16 activations (with fp32 ones they are
13-35x slower), which is why `quantize_model` runs the rest of the model in bf16 unless told otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LlmlabError
from ..options import INT4_GROUP_SIZES, QUANTIZED_WEIGHTS
from . import int8_dot
from .packing import pack_int4, unpack_int4
from .quantize import dequantize, quantize_asymmetric, quantize_fp8, quantize_symmetric


PREFILL_ROWS = 16                       # above this many tokens, CUDA int4 unpacks and uses cuBLAS


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (tokens, K): the CPU kernels take 2-D activations only."""
    return x.reshape(-1, x.shape[-1])


class Int8Linear(nn.Module):
    """Symmetric per-channel int8: y = (x @ q^T) * scale, exact rearrangement of x @ (q * scale)^T
    because each output column n has one scale."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_symmetric(weight, bits=8, per="channel")
        self.register_buffer("weight", q)                                  # (N, K) int8
        self.register_buffer("scale", scale[:, 0].to(dtype))               # (N,) in the activations' dtype
        self.int8_dot = False          # kernels="int8-dot": int8 activations, integer dot products (CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            tokens = flatten_tokens(x)
            if self.int8_dot and tokens.shape[0] <= int8_dot.DOT_ROWS:
                y = torch.ops.llmlab.int8_int8_dot(tokens.contiguous(), self.weight, self.scale)
            else:
                y = torch.ops.aten._weight_int8pack_mm(tokens, self.weight, self.scale)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.weight, self.scale[:, None])


def scales_and_zeros(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """PyTorch's int4 kernels' table (K/group, N, 2) for the same weights: they compute
    W = (q - 8) * scale + zero, so zero = offset + 8 * scale (in fp32, rounded once by the caller)."""
    scales, offsets = scales.float(), offsets.float()
    return torch.stack([scales, offsets + 8 * scales], dim=-1).transpose(0, 1).contiguous()


class Int4Linear(nn.Module):
    """Group-wise int4, W[n, k] = q[n, k] * scale[n, g] + offset[n, g] with g = k // group_size.

    One form for both kinds: asymmetric (the default) has offset = the group's minimum, as GGUF's Q4_1;
    symmetric stores q + 8 (0..15) with offset = -8 * scale.

    `packed`, `scales`, `offsets` are that form, which `llmlab.kernels.int4_gemv.int4_matmul` takes on
    CUDA. PyTorch's CPU kernel wants its own tiled packing and, per group, (scale, zero) with
    W = (q - 8) * scale + zero, so zero = offset + 8 * scale; on CPU the layer also keeps that copy
    (another half byte per weight in memory; a matmul reads only one of the two).
    """

    def __init__(self, weight: torch.Tensor, group_size: int = 32, symmetric: bool = False,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise LlmlabError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                              f"got {group_size!r}")
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        if symmetric:
            q, scale = quantize_symmetric(weight, bits=4, per=group_size)   # q in -7..7
            q, offset = q + 8, -8 * scale
        else:
            q, scale, offset = quantize_asymmetric(weight, bits=4, per=group_size)
        self.register_buffer("packed", pack_int4(q))                      # (N, K/2) uint8
        self.register_buffer("scales", scale.to(dtype))                   # (N, K/group)
        self.register_buffer("offsets", offset.to(dtype))                 # (N, K/group)
        if weight.device.type == "cpu":
            inner_k_tiles = 2   # how many 16-column tiles the kernel interleaves; any of 2, 4, 8 gives the same result
            cpu_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), inner_k_tiles)
            self.register_buffer("cpu_packed", cpu_packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros(scale, offset).to(dtype))   # (K/group, N, 2)
        self.int8_dot = False          # kernels="int8-dot": int8 activations, integer dot products (CPU)
        self.kernel_layout = None      # llmlab.kernels.int4_gemv.Int4Weights, on CUDA (see forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = flatten_tokens(x)
        if x.device.type == "cpu" and self.int8_dot and tokens.shape[0] <= int8_dot.DOT_ROWS:
            y = torch.ops.llmlab.int4_int8_dot(tokens.contiguous(), self.packed, self.scales, self.offsets, self.group_size)
        elif x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(tokens, self.cpu_packed, self.group_size,
                                                           self.scales_and_zeros)
        elif tokens.shape[0] <= PREFILL_ROWS:
            from llmlab.kernels.int4_gemv import int4_matmul, prepare_int4   # Triton: only where it can run
            if self.kernel_layout is None or self.kernel_layout.words.device != x.device:
                # The GEMV's own layout, made at the first call on this device (a warm-up, before any
                # CUDA graph is captured): another copy of the weights' bytes, as cpu_packed is on CPU.
                self.kernel_layout = prepare_int4(self.packed, self.scales, self.offsets, self.group_size)
            y = int4_matmul(tokens, self.packed, self.scales, self.offsets, self.group_size, self.kernel_layout)
        else:
            # a prefill is compute bound: reading 4-bit weights saves nothing there, so unpack them
            # once for this call and let cuBLAS do the matmul (measured on an H100: the int4 kernel at
            # 512 tokens ran at 0.06-0.27x of bf16)
            y = F.linear(tokens, self.dequantize().to(tokens.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize(unpack_int4(self.packed), self.scales, self.offsets)


class Fp8Linear(nn.Module):
    """Per-channel fp8 e4m3 weights: y = (x @ q^T) * scale. No fast kernel is used: q is upcast to the
    activations' dtype at each call (slow on CPU, about 10x an fp32 decode step), so this layer shows
    fp8's accuracy, not its speed."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_fp8(weight, per="channel")
        self.register_buffer("weight", q)                                  # (N, K) float8_e4m3fn
        self.register_buffer("scale", scale[:, 0].to(dtype))               # (N,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scale

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.weight, self.scale[:, None])


QUANTIZED_LINEARS = (Int8Linear, Int4Linear, Fp8Linear)

# The linears of each block that are quantized, as (submodule, attribute).
BLOCK_LINEARS = [("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
                 ("mlp", "w_gate"), ("mlp", "w_up"), ("mlp", "w_down")]


def quantized_linear(weight: torch.Tensor, weights: str, group_size: int | None, dtype: torch.dtype) -> nn.Module:
    if weights == "int8":
        return Int8Linear(weight, dtype)
    if weights == "int4":
        return Int4Linear(weight, 32 if group_size is None else group_size, dtype=dtype)   # 0 is refused, not 32
    return Fp8Linear(weight, dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, weights: str, group_size: int | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every block's attention (wq, wk, wv, wo) and MLP (w_gate, w_up, w_down) linears with
    quantized ones, in place; return the model.

    weights: "int8" (per-channel symmetric), "int4" (group-wise asymmetric, group_size 32 by default)
    or "fp8" (e4m3, per-channel). Quantize from fp32 weights for the most faithful result.
    dtype: what the rest of the model (embedding, norms, head) is cast to, and so the dtype of every
    activation; bf16, the one PyTorch's CPU int8/int4 kernels are fast with.

    The embedding and the LM head stay unquantized: in SmolLM2 they are one tied matrix, which the
    embedding reads as a table lookup (no matmul to speed up), and the head is the layer the output is
    most sensitive to, since its errors land directly on the logits.
    """
    if weights not in QUANTIZED_WEIGHTS:
        raise LlmlabError(f"unknown quantized weights {weights!r}; choose one of: {', '.join(QUANTIZED_WEIGHTS)}")
    if group_size is not None and weights != "int4":
        raise LlmlabError(f"group_size applies to int4 weights only ({weights} has one scale per output row)")
    replacements = []   # all quantized before any is swapped in, so that an error leaves the model as it was
    for i, block in enumerate(model.layers):
        for part, name in BLOCK_LINEARS:
            owner = getattr(block, part)
            try:
                quantized = quantized_linear(getattr(owner, name).weight, weights, group_size, dtype)
            except LlmlabError as e:
                raise LlmlabError(f"layers.{i}.{part}.{name}: {e}") from None
            replacements.append((owner, name, quantized))
    # The fused q/k/v and gate/up matmuls read a stacked copy of the float weights, past the linears
    # replaced here: go back to the separate projections.
    model.fuse_projections(False)
    for owner, name, quantized in replacements:
        setattr(owner, name, quantized)
    # Quantized layers hold buffers, not parameters: what is left are the embedding (and the head tied
    # to it: one Parameter, cast once) and the norms.
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


@torch.no_grad()
def quantize_head(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace the LM head by an int8 copy (per output row, symmetric), in place; return the model.

    The head is the largest matrix a small model reads per token (SmolLM2: 49,152 x 576, half the bytes of
    an int4 model whose head stayed bf16). Tied to the embedding, it gets its own quantized copy: the
    embedding keeps its float table, of which a decode step reads one row. Quantize from fp32 weights."""
    model.head = Int8Linear(model.head.weight.detach(), dtype)
    return model


def use_int8_dot(model: nn.Module) -> nn.Module:
    """kernels="int8-dot": switch every int4 and int8 linear of the model (the head too, if int8) to
    llmlab's C kernel for decode-sized inputs (llmlab.quant.int8_dot), in place; return the model.
    The kernel is built here, so that a missing compiler or CPU feature is reported at load time."""
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    if not layers:
        raise LlmlabError("kernels='int8-dot' found no int4 or int8 linear layers: load with weights='int4' "
                          "or 'int8', or head='int8'")
    if any(buffer.device.type != "cpu" for buffer in model.buffers()):
        raise LlmlabError("kernels='int8-dot' is a CPU kernel: load on device='cpu' (on a GPU, int4 weights "
                          "use llmlab's Triton kernel without it)")
    int8_dot.library()
    for layer in layers:
        layer.int8_dot = True
    return model
