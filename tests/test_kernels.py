"""Every Triton kernel against its PyTorch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (llmlab.kernels sets
TRITON_INTERPRET=1), at small shapes chosen to hit the masked edges: sizes that are not multiples
of the block, sequence lengths like 37, grouped-query heads. The interpreter gets bf16 arithmetic
wrong, so these checks use fp32, and fp16 where tl.dot runs. The `gpu` tests repeat them natively
in bf16/fp16 at larger shapes.

Tolerances:
- fp32 elementwise and row reductions: rtol 1e-5 (only the order of a sum differs, ~1e-7 relative).
- fp32 tl.dot: atol/rtol 1e-4 (sums of up to a few hundred products in another order).
- fp16 tl.dot: 1e-2 (the inputs, and attention's probabilities before P @ V, are rounded to fp16,
  ~5e-4 relative each, and errors add up over the reduction).
- on a GPU, of the largest output: bf16 2e-2 (8 significant bits: 4e-3 relative per rounding, and
  inputs, probabilities and dequantized weights are each rounded), fp16 1e-2 (11 bits).
"""

import math

import pytest
import torch

from llmlab import kernels, model

pytest.importorskip("triton")   # after llmlab.kernels, which must set TRITON_INTERPRET before triton loads

from llmlab.kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402
from llmlab.kernels.flash_attention import flash_attention, flash_attention_reference  # noqa: E402
from llmlab.kernels.int4_gemv import (int4_gemv, int4_matmul, int4_matmul_reference, prepare_int4,  # noqa: E402
                                      unprepare_int4)
from llmlab.quant.packing import unpack_int4  # noqa: E402
from llmlab.kernels.matmul import matmul, matmul_reference, matmul_tma  # noqa: E402
from llmlab.kernels.rms_norm import (rms_norm, rms_norm_reference, rms_norm_residual,  # noqa: E402
                                     rms_norm_residual_reference)
from llmlab.kernels.rope import apply_rope_, apply_rope_reference  # noqa: E402
from llmlab.kernels.softmax import softmax, softmax_reference  # noqa: E402
from llmlab.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402
from llmlab.kernels.vector_add import vector_add, vector_add_reference  # noqa: E402

DOT_TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def assert_close_to_scale(actual, expected, tol):
    """Largest error within tol of the largest output: for low precision, where values near zero
    carry an absolute error set by the magnitudes summed, not by their own size."""
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol * expected.float().abs().max().item(), f"max error {err:.3g}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile natively")
def test_without_a_gpu_kernels_run_in_the_interpreter():
    assert kernels.interpreted()


def test_vector_add():
    x, y = torch.randn(3000), torch.randn(3000)         # 3 programs, the last one masked
    torch.testing.assert_close(vector_add(x, y), vector_add_reference(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 100), (3, 1024), (1, 1)])
def test_softmax(shape):
    x = torch.randn(shape) * 5
    torch.testing.assert_close(softmax(x), softmax_reference(x), rtol=1e-5, atol=1e-6)


def test_softmax_strided_rows():
    x = torch.randn(4, 128)[:, :100]                      # rows 128 apart, 100 columns used
    torch.testing.assert_close(softmax(x), softmax_reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 100), (2, 5, 576)])
def test_rms_norm_and_fused_residual(shape):
    x, residual = torch.randn(shape), torch.randn(shape)
    w = torch.randn(shape[-1])
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    y, h = rms_norm_residual(x, residual, w, 1e-5)
    y_ref, h_ref = rms_norm_residual_reference(x, residual, w, 1e-5)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_the_model():
    norm = model.RMSNorm(100, 1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 100)
    torch.testing.assert_close(rms_norm(x, norm.weight.detach(), 1e-5), norm(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 1000), (7, 37)])
def test_swiglu(shape):
    gate, up = torch.randn(shape) * 3, torch.randn(shape)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_in_place_with_gqa_and_strided_q(head_dim):
    batch, seq, n_heads, n_kv_heads = 1, 37, 4, 2
    # q as the model makes it: the projection viewed (batch, seq, heads, d) then transposed.
    q = torch.randn(batch, seq, n_heads, head_dim).transpose(1, 2)
    k = torch.randn(batch, n_kv_heads, seq, head_dim)
    cos, sin = model.rope_cos_sin(torch.arange(5, 5 + seq), head_dim, 10000.0, torch.float32)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    q_out, k_out = apply_rope_(q, k, cos, sin)
    assert q_out is q and k_out is k                     # rotated in place
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mnk", [(100, 90, 70), (64, 48, 64)])   # ragged edges and K; then even K
def test_matmul(dtype, mnk):
    m, n, k = mnk
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    # 32x32x32 blocks with GROUP_M=2: 4 x 3 tiles, so the grouped ordering has a short last group.
    c = matmul(a, b, block_m=32, block_n=32, block_k=32, group_m=2)
    torch.testing.assert_close(c, matmul_reference(a, b), rtol=DOT_TOL[dtype], atol=DOT_TOL[dtype] * math.sqrt(k))


def random_int4(n, k, group_size, dtype):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)   # every byte is two valid nibbles
    scales = (torch.rand(n, k // group_size) * 0.02 + 0.005).to(dtype)
    offsets = (torch.randn(n, k // group_size) * 0.1).to(dtype)
    return packed, scales, offsets


def test_unpack_int4_nibble_order():
    assert unpack_int4(torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)).tolist() == [[1, 2, 0, 15]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, k, group_size", [
    (1, 256, 32),      # GEMV: 8 groups, two full unrolled steps of 4
    (1, 640, 64),      # GEMV: 10 groups, the third step masked past group 10
    (5, 256, 64),      # GEMM from here on: x padded to 16 rows
    (16, 256, 128),
    (70, 512, 256),    # a prefill: two blocks of 64 rows
])
def test_int4_matmul(dtype, m, k, group_size):
    n = 100                                              # 100 outputs: the last block is ragged
    packed, scales, offsets = random_int4(n, k, group_size, dtype)
    x = torch.randn(m, k).to(dtype)
    y = int4_matmul(x, packed, scales, offsets, group_size)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close_to_scale(y, int4_matmul_reference(x, packed, scales, offsets, group_size), DOT_TOL[dtype])


@pytest.mark.parametrize("m", [1, 5])
def test_int4_matmul_fp32_scales_with_fp16_x(m):
    packed, scales, offsets = random_int4(100, 256, 64, torch.float32)
    x = torch.randn(m, 256).half()
    y = int4_matmul(x, packed, scales, offsets, 64)
    assert y.dtype == torch.float16
    assert_close_to_scale(y, int4_matmul_reference(x, packed, scales, offsets, 64), DOT_TOL[torch.float16])


@pytest.mark.parametrize("config", [(64, 1, 1, 4), (32, 2, 2, 4), (64, 1, 4, 2), (16, 2, 8, 4)])
def test_int4_gemv_layout_steps_and_split_k(config):
    """Every way the GEMV cuts the work (outputs per program, groups per step, K slices merged by the
    last slice to arrive) gives the same product; and the arrival counters are left at zero, ready for
    the next call or graph replay."""
    packed, scales, offsets = random_int4(100, 1024, 64, torch.float32)   # 16 groups; 100 outputs: ragged
    weights = prepare_int4(packed, scales, offsets, 64)
    assert torch.equal(unprepare_int4(weights), packed)
    x = torch.randn(1, 1024)
    for _ in range(2):                                   # a second call reuses the counters
        y = int4_gemv(x, weights, config=config)
        assert_close_to_scale(y, int4_matmul_reference(x, packed, scales, offsets, 64), DOT_TOL[torch.float32])
    assert all(not c.any() for c in kernels._arrivals.values())


@pytest.mark.parametrize("m, k, group_size, config", [
    (3, 576, 32, None),             # SmolLM2's K: 4.5 steps of 128 columns, the last one masked
    (3, 576, 64, (32, 1, 4, 3)),
    (9, 1024, 128, (64, 8, 4, 3)),  # one group a step, 8 slices merged by the last to arrive
    (70, 1024, 256, (16, 4, 4, 3)), # two blocks of 64 rows, each with its own counters
])
def test_int4_gemm_steps_groups_and_split_k(m, k, group_size, config):
    """The GEMM's every cut (steps past K, several groups a step or one, K slices merged in the kernel)
    gives the product; the arrival counters are left at zero for the next call or graph replay."""
    packed, scales, offsets = random_int4(100, k, group_size, torch.float32)
    x = torch.randn(m, k)
    for _ in range(2):
        y = int4_matmul(x, packed, scales, offsets, group_size, config=config)
        assert_close_to_scale(y, int4_matmul_reference(x, packed, scales, offsets, group_size), DOT_TOL[torch.float32])
    assert all(not c.any() for c in kernels._arrivals.values())


def test_int4_gemv_refuses_a_split_that_does_not_divide_the_groups():
    weights = prepare_int4(*random_int4(8, 640, 64, torch.float32), 64)   # 10 groups
    with pytest.raises(ValueError, match="10 groups do not split into 4"):
        int4_gemv(torch.randn(1, 640), weights, config=(64, 1, 4, 4))


def test_int4_matmul_rejects_a_group_tl_dot_cannot_step():
    with pytest.raises(ValueError, match="group_size"):
        int4_matmul(torch.randn(1, 64), *random_int4(8, 64, 16, torch.float32), 16)


def qkv(batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, dtype, device="cpu"):
    q = torch.randn(batch, n_heads, q_len, head_dim, device=device).to(dtype)
    k = torch.randn(batch, n_kv_heads, kv_len, head_dim, device=device).to(dtype)
    v = torch.randn(batch, n_kv_heads, kv_len, head_dim, device=device).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_len, kv_len", [(37, 37), (5, 37), (1, 1)])   # prefill, chunk after a cache, one token
def test_flash_attention_causal_gqa(dtype, head_dim, q_len, kv_len):
    q, k, v = qkv(1, 4, 2, q_len, kv_len, head_dim, dtype)
    # BLOCK_M > BLOCK_N: the diagonal spans two key blocks, one partly and one fully masked for some rows.
    o = flash_attention(q, k, v, block_m=32, block_n=16)
    assert_close_to_scale(o, flash_attention_reference(q, k, v), DOT_TOL[dtype])


def test_flash_attention_key_blocks_larger_than_query_blocks_and_batch():
    q, k, v = qkv(2, 2, 2, 40, 70, 64, torch.float32)
    o = flash_attention(q, k, v, block_m=16, block_n=32)
    torch.testing.assert_close(o, flash_attention_reference(q, k, v), rtol=1e-4, atol=1e-4)


def test_flash_attention_refuses_more_queries_than_keys():
    q, k, v = torch.randn(1, 2, 8, 64), torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="q_len"):
        flash_attention(q, k, v)


def test_decode_attention_merges_in_one_launch_for_any_group_and_batch():
    """The last split of each (batch, KV head) to arrive merges all its query heads' splits: 3 query heads
    per KV head (padded to 4 in the merge's load), 2 sequences, 1, 3 and 4 splits (the last one ragged),
    one call after the other: each must find the arrival counters back at zero."""
    from llmlab import kernels
    q = torch.randn(2, 9, 1, 64)
    k, v = cache_view(2, 3, 200, 64, torch.float32), cache_view(2, 3, 200, 64, torch.float32)
    for splits in (1, 3, 4):
        o = decode_attention(q, k, v, n_splits=splits, block_n=32)
        torch.testing.assert_close(o, decode_attention_reference(q, k, v), rtol=1e-4, atol=1e-4)
    assert all(not c.any() for c in kernels._arrivals.values())


def test_flash_attention_tma_refused_where_there_is_none():
    """TMA is a Hopper copy engine: asked for on a CPU (the interpreter), the call says so and how to fix it."""
    q, k, v = qkv(1, 4, 2, 8, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="tma=True needs a Hopper"):
        flash_attention(q, k, v, tma=True)


def cache_view(batch, n_kv_heads, length, head_dim, dtype, capacity=320, device="cpu"):
    """The first `length` positions of a preallocated cache: a view whose head stride is capacity * d."""
    return torch.randn(batch, n_kv_heads, capacity, head_dim, device=device).to(dtype)[:, :, :length]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", [1, 45, 300])
def test_decode_attention_split_k_over_a_cache_view(dtype, head_dim, length):
    q = torch.randn(1, 4, 1, head_dim).to(dtype)                       # 4 query heads, 2 KV heads
    k, v = cache_view(1, 2, length, head_dim, dtype), cache_view(1, 2, length, head_dim, dtype)
    # 4 splits of whole 64-key blocks: 300 keys -> 3 splits, the last one ragged; 45 and 1 -> 1 split.
    o = decode_attention(q, k, v, n_splits=4)
    assert o.shape == q.shape
    assert_close_to_scale(o, decode_attention_reference(q, k, v), DOT_TOL[dtype])


# ---- natively on a GPU, in the dtypes a model runs in, at sizes where the block edges still show


GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}
gpu_dtypes = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])


@pytest.mark.gpu
@gpu_dtypes
def test_gpu_elementwise_and_row_kernels(dtype):
    x, residual = (torch.randn(1000, 4100, device="cuda", dtype=dtype) for _ in range(2))   # rows of 4100: masked
    w = torch.randn(4100, device="cuda", dtype=dtype)
    assert_close_to_scale(vector_add(x, residual), vector_add_reference(x, residual), GPU_TOL[dtype])
    assert_close_to_scale(softmax(x), softmax_reference(x), GPU_TOL[dtype])
    assert_close_to_scale(swiglu(x, residual), swiglu_reference(x, residual), GPU_TOL[dtype])
    assert_close_to_scale(rms_norm(x, w), rms_norm_reference(x, w), GPU_TOL[dtype])
    y, h = rms_norm_residual(x, residual, w)
    y_ref, h_ref = rms_norm_residual_reference(x, residual, w)
    assert torch.equal(h, h_ref)
    assert_close_to_scale(y, y_ref, GPU_TOL[dtype])


@pytest.mark.gpu
@gpu_dtypes
def test_gpu_rope(dtype):
    q = torch.randn(2, 1000, 32, 128, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 8, 1000, 128, device="cuda", dtype=dtype)
    cos, sin = model.rope_cos_sin(torch.arange(1000, device="cuda"), 128, 500000.0, dtype)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    apply_rope_(q, k, cos, sin)
    assert_close_to_scale(q, q_ref, GPU_TOL[dtype])
    assert_close_to_scale(k, k_ref, GPU_TOL[dtype])


@pytest.mark.gpu
@gpu_dtypes
@pytest.mark.parametrize("mnk", [(1000, 1500, 777), (1000, 1496, 776), (2048, 2048, 2048)])
def test_gpu_matmul(dtype, mnk):
    m, n, k = mnk
    a, b = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(k, n, device="cuda", dtype=dtype)
    assert_close_to_scale(matmul(a, b), matmul_reference(a, b), GPU_TOL[dtype])
    if torch.cuda.get_device_capability()[0] < 9:       # TMA: Hopper and later
        return
    if k % 8:                                           # rows not on 16-byte boundaries: TMA cannot copy them
        with pytest.raises(ValueError, match="16-byte"):
            matmul_tma(a, b)
    else:
        assert_close_to_scale(matmul_tma(a, b), matmul_reference(a, b), GPU_TOL[dtype])


@pytest.mark.gpu
@gpu_dtypes
@pytest.mark.parametrize("m, group_size", [(1, 128), (1, 32), (16, 32), (300, 128)])
def test_gpu_int4_matmul(dtype, m, group_size):
    packed, scales, offsets = (t.cuda() for t in random_int4(4096 + 96, 4096, group_size, dtype))
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    y = int4_matmul(x, packed, scales, offsets, group_size)
    assert_close_to_scale(y, int4_matmul_reference(x, packed, scales, offsets, group_size), GPU_TOL[dtype])


@pytest.mark.gpu
def test_gpu_int4_gemv_lop3_asm_equals_plain_triton_and_replays_in_a_graph():
    """The lop3 inline-asm unpacking and its plain-Triton twin compute the same bits; and split-K's
    arrival counters let a CUDA graph replay the GEMV with new inputs, right every time."""
    packed, scales, offsets = (t.cuda() for t in random_int4(14336, 4096, 128, torch.bfloat16))
    weights = prepare_int4(packed, scales, offsets, 128)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(int4_gemv(x, weights, asm=True), int4_gemv(x, weights, asm=False))
    y = int4_gemv(x, weights, config=(64, 1, 8, 4))               # eager first: the counters exist
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int4_gemv(x, weights, config=(64, 1, 8, 4))
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert_close_to_scale(y, int4_matmul_reference(x, packed, scales, offsets, 128), GPU_TOL[torch.bfloat16])


@pytest.mark.gpu
@gpu_dtypes
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_len, kv_len", [(1000, 1000), (300, 1333)])
def test_gpu_flash_attention(dtype, head_dim, q_len, kv_len):
    q, k, v = qkv(2, 32, 8, q_len, kv_len, head_dim, dtype, device="cuda")
    assert_close_to_scale(flash_attention(q, k, v), flash_attention_reference(q, k, v), GPU_TOL[dtype])


@pytest.mark.gpu
@gpu_dtypes
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_len, kv_len", [(1000, 1000), (300, 1333), (1, 777)])
def test_gpu_flash_attention_through_tma(dtype, head_dim, q_len, kv_len):
    """The TMA path over views of a cache with room left: tiles past the keys must come back as zeros
    (not the next positions' stale rows), tiles past the queries must not be written; and it agrees
    with the pointer path to the reference's tolerance."""
    q = torch.randn(2, 32, q_len, head_dim, device="cuda", dtype=dtype)
    k = cache_view(2, 8, kv_len, head_dim, dtype, capacity=kv_len + 200, device="cuda")
    v = cache_view(2, 8, kv_len, head_dim, dtype, capacity=kv_len + 200, device="cuda")
    for t in (k, v):                          # the positions past kv_len: poison, never to be read
        t.as_strided((2, 8, 200, head_dim), t.stride(), t.storage_offset() + kv_len * head_dim).fill_(float("nan"))
    expected = flash_attention_reference(q, k, v)
    assert_close_to_scale(flash_attention(q, k, v, tma=True), expected, GPU_TOL[dtype])
    assert_close_to_scale(flash_attention(q, k, v, tma=False), expected, GPU_TOL[dtype])


@pytest.mark.gpu
def test_gpu_flash_attention_tma_refuses_heads_that_do_not_merge_with_the_batch():
    q, k, v = qkv(2, 16, 16, 64, 64, 128, torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="merge into one stride"):
        flash_attention(q[:, :8], k[:, :8], v[:, :8], tma=True)
    assert_close_to_scale(flash_attention(q[:, :8], k[:, :8], v[:, :8]),         # tma=None: pointers
                          flash_attention_reference(q[:, :8], k[:, :8], v[:, :8]), GPU_TOL[torch.bfloat16])


@pytest.mark.gpu
@gpu_dtypes
@pytest.mark.parametrize("length", [1, 1000, 16384])
def test_gpu_decode_attention(dtype, length):
    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=dtype)
    k = cache_view(2, 8, length, 128, dtype, capacity=16400, device="cuda")
    v = cache_view(2, 8, length, 128, dtype, capacity=16400, device="cuda")
    assert_close_to_scale(decode_attention(q, k, v), decode_attention_reference(q, k, v), GPU_TOL[dtype])
