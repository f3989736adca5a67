"""The decode step as five Triton kernels per layer (kernels="fused-decode"): fusion across the matmuls.

torch.compile fuses the elementwise operations *between* matmuls into generated kernels, but each matmul
stays a library call (cuBLAS), so a layer still costs a dozen launches. At batch 1 a small model's step is
bound by those launches, not by its bytes (notebook 08). The cure is to fuse *into* the matmuls: at
decode each is a matrix-vector product, simple enough to write by hand with its neighbours inside it.

    1  x -> RMSNorm -> [W_q; W_k; W_v] -> RoPE -> q, and k, v into the cache    kernels/fused_qkv.py
    2  attention of q over the cache, split along the keys, the splits merged   kernels/decode_attention.py
       by the last to finish, in the same launch
    3  h = x + W_o o                                                            kernels/fused_matvec.py
    4  g = silu(W_gate n) * W_up n,  n = RMSNorm(h)                             (the same matvec kernel)
    5  x = h + W_down g

then RMSNorm and the LM head in one more. With int4 weights (weights="int4") the products 1, 3, 4, 5 are
the same fusions around the int4 GEMV (kernels/fused_int4.py), reading each layer's weights in the
kernels' own layout, made once when the step is built (another copy of the int4 bytes; the layers' own
packed form stays for prefill); the LM head stays in the model's float dtype. Under tensor parallelism (llmlab.parallel) each rank runs the
same kernels over its own heads and channels; the row-parallel products 3 and 5 are partial sums, all-reduced
before the next kernel reads them, with the residual added on rank 0 only (so it is counted once), and the
head's slice of the logits is all-gathered. Every shape is fixed and positions are a tensor, so the whole
step is replayed from a CUDA graph (cuda_graphs=True). The step computes exactly what Transformer.forward
does at one token; it only reads the weights the model already holds (fused=True's stacked [W_q; W_k; W_v]
and [W_gate; W_up]) and the static cache. Prefill, whose matmuls are real matrix products, stays on the
plain path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .kv_cache import KVCache
from .model import Transformer, triton_kernel
from .parallel import tensor_parallel_of
from .quant.linear import Int4Linear


class Int4Layer(NamedTuple):
    """One block's int4 weights in the fused kernels' layouts (llmlab.kernels.int4_gemv.Int4Weights)."""
    qkv: object
    o: object
    gate_up: object
    down: object


def int4_weights(model: Transformer) -> bool:
    return isinstance(model.layers[0].attention.wq, Int4Linear)


def check_fusable(model: Transformer, cache) -> None:
    """What the fused step reads: stacked float weights or int4 linears, and a static cache in the model's
    dtype; makes the int4 layouts. EngineOptions refuses the switch combinations that break these; this
    guards direct callers."""
    dtype = model.embed.weight.dtype
    if int4_weights(model):
        make_int4_layouts(model)
    elif any(block.attention.wqkv is None for block in model.layers):
        raise ValueError("the fused decode step reads the stacked weights: call model.fuse_projections() first")
    if type(cache) is not KVCache or cache.keys[0].dtype != dtype:
        raise ValueError("the fused decode step writes a static KVCache stored in the model's dtype")
    if tensor_parallel_of(model) is not None and int4_weights(model):
        raise ValueError("the fused decode step reads int4 weights on one device only (tp=1)")


def make_int4_layouts(model: Transformer) -> None:
    """Each block's `int4_layout`, made again only when its layers' device or scales' dtype changed, and
    before any CUDA graph is captured (a graph replays the memory it was captured with)."""
    fused_int4 = triton_kernel("fused_int4")
    for block in model.layers:
        attention, mlp = block.attention, block.mlp
        layout = getattr(block, "int4_layout", None)
        scales = attention.wo.scales
        if layout is None or (layout.o.scales.device, layout.o.scales.dtype) != (scales.device, scales.dtype):
            block.int4_layout = Int4Layer(
                fused_int4.qkv_layout(attention.wq, attention.wk, attention.wv, model.config.head_dim),
                fused_int4.stacked([attention.wo]), fused_int4.glu_layout(mlp.w_gate, mlp.w_up),
                fused_int4.stacked([mlp.w_down]))


def products_of(model: Transformer):
    """The step's product kernels (matvec, qkv_rope_cache) for the model's weights, and each block's four
    weights (qkv, o, gate_up, down) in the layout those kernels read. The LM head is float either way."""
    if int4_weights(model):
        fused_int4 = triton_kernel("fused_int4")
        return fused_int4.matvec, fused_int4.qkv_rope_cache, [block.int4_layout for block in model.layers]
    weights = [(block.attention.wqkv, block.attention.wo.weight, block.mlp.w_gate_up, block.mlp.w_down.weight)
               for block in model.layers]
    return triton_kernel("fused_matvec").matvec, triton_kernel("fused_qkv").qkv_rope_cache, weights


def decode_logits(model: Transformer, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token (batch, 1) at positions pos (batch,) -> logits (batch, vocab); writes k, v at pos into the cache.

    The same numbers as model(token, start_pos=pos, cache=cache)[:, -1], up to the order of the sums
    (each dot product is accumulated in fp32 in blocks) and one rounding fewer between fused operations."""
    matvec, qkv_rope_cache, weights = products_of(model)
    attend = triton_kernel("decode_attention").decode_attention_at_positions
    shard = tensor_parallel_of(model)
    total = (lambda partial: partial) if shard is None else shard.all_reduce     # of the row-parallel products
    on_one_rank = shard is None or shard.rank == 0                                 # the residual, added once
    x = model.embed(token[:, 0])                                                    # (batch, dim)
    for i, (block, (wqkv, wo, w_gate_up, w_down)) in enumerate(zip(model.layers, weights)):
        keys, values = cache.keys[i], cache.values[i]
        q = qkv_rope_cache(x, block.attn_norm.weight, block.attn_norm.eps, wqkv,
                           model.rope_cos, model.rope_sin, pos, keys, values)      # (batch, heads, head_dim)
        o = attend(q, keys, values, pos, block_n=32).flatten(1)                     # (batch, heads * head_dim)
        h = total(matvec(o, wo, residual=x if on_one_rank else None))
        g = matvec(h, w_gate_up, norm=block.mlp_norm.weight, eps=block.mlp_norm.eps, glu=True)
        x = total(matvec(g, w_down, residual=h if on_one_rank else None))
    logits = triton_kernel("fused_matvec").matvec(x, model.head.weight, norm=model.norm.weight, eps=model.norm.eps)
    return logits if shard is None else model.head.gather(logits)
