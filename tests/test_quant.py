"""llmlab.quant against the maths of each format, and the quantized model against the fp32 one.

Bounds. Round to nearest leaves every integer-quantized weight within half a step of the original:
|w - deq(q(w))| <= scale / 2, each weight against its own group's scale (plus float32 rounding, 1e-6
of the magnitudes involved). fp8 e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4 where
w / scale is a normal e4m3 number, and at most half the subnormal spacing (2^-10 * scale) below 2^-6.

Kernels. PyTorch's CPU int8/int4 kernels run in bf16: their outputs are compared with F.linear on the
dequantized fp32 weight, with a max error of 1e-2 relative to the largest output (bf16 keeps 8 bits).

Model. Quantizing changes the logits, so the model is checked by top-1 agreement and KL against fp32
on 128 tokens of Hamlet, with bounds a few times looser than what was measured (int8: 0.92 / 0.005;
int4: 0.96 / 0.0013; fp8: 0.87 / 0.027). The shipped weights are GGUF Q4_1 with groups of 32, so
asymmetric int4 with groups of 32 re-encodes them without loss: what int4 loses there is bf16's.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmlab
from llmlab.errors import LlmlabError
from llmlab.eval import kl_divergence, perplexity, top1_agreement
from llmlab.options import EngineOptions
from llmlab.model import Attention
from llmlab.quant import (Fp8Linear, Int4Linear, Int8Linear, dequantize, pack_int4, quantize_asymmetric,
                          quantize_fp8, quantize_model, quantize_symmetric, unpack_int4)
from llmlab.quant.evaluate import compare, held_out_ids
from llmlab.quant.linear import BLOCK_LINEARS, quantized_linear

KERNEL_TOLERANCE = 1e-2


def per_weight(scale: torch.Tensor, shape) -> torch.Tensor:
    """Each weight's own scale: scale (rows, groups) spread over (N, K)."""
    n, k = shape
    return scale.repeat_interleave(k // scale.shape[1], dim=1).expand(n, k)


def random_weights(n: int, k: int, seed: int, outlier: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if outlier:
        w[0, k // 3] = outlier    # one large weight, as LLM weight matrices have
    return w


def max_relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference).abs().max() / reference.abs().max()).item()


# --- the quantizers ------------------------------------------------------------------------------

@settings(deadline=None, max_examples=60)
@given(n=st.integers(1, 6), groups=st.integers(1, 4), group=st.sampled_from([32, 64, 128]),
       per=st.sampled_from(["tensor", "channel", "group"]), symmetric=st.booleans(), bits=st.sampled_from([4, 8]),
       outlier=st.sampled_from([0.0, 3.0, -1e4]), seed=st.integers(0, 2**16))
def test_integer_round_trip_is_within_half_a_step_of_its_group(n, groups, group, per, symmetric, bits, outlier, seed):
    w = random_weights(n, groups * group, seed, outlier)
    per = group if per == "group" else per
    if symmetric:
        q, scale = quantize_symmetric(w, bits, per)
        offset = None
        assert q.dtype == torch.int8 and q.abs().max() <= 2 ** (bits - 1) - 1
    else:
        q, scale, offset = quantize_asymmetric(w, bits, per)
        assert q.dtype == torch.uint8 and q.max() <= 2 ** bits - 1
    rows, n_groups = {"tensor": (1, 1), "channel": (n, 1)}.get(per, (n, groups))
    assert scale.shape == (rows, n_groups)
    error = (w - dequantize(q, scale, offset)).abs()
    step = per_weight(scale, w.shape)
    assert (error <= step / 2 + 1e-6 * (w.abs() + step * 2**bits)).all()


def test_an_outlier_costs_precision_only_in_its_own_group():
    w = random_weights(4, 256, seed=1, outlier=10.0)        # the outlier sits in row 0, columns 64..95
    per_channel = dequantize(*quantize_symmetric(w, 4, "channel"))[0]
    per_group = dequantize(*quantize_symmetric(w, 4, 32))[0]
    others = torch.ones(256, dtype=torch.bool)
    others[64:96] = False                                    # row 0 outside the outlier's group
    # One scale for the row is 10/7: every other weight of the row (about 0.05) rounds to zero.
    assert (per_channel[others] == 0).all()
    assert (w[0] - per_group)[others].abs().max() < (w[0] - per_channel)[others].abs().max() / 5


def test_zero_and_constant_groups_come_back_exactly():
    w = torch.zeros(3, 64)
    w[1] = 0.25                                                 # constant row: zero range for asymmetric
    for q_scale_offset in (quantize_symmetric(w, 4, 32), quantize_asymmetric(w, 4, 32), quantize_fp8(w)):
        assert torch.equal(dequantize(*q_scale_offset), w)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("per", ["tensor", "channel", 32])
def test_fp8_round_trip_has_a_relative_error_of_at_most_two_to_the_minus_four(per, seed):
    w = random_weights(8, 128, seed, outlier=5.0) * torch.logspace(-4, 0, 128)   # spans normals and subnormals
    q, scale = quantize_fp8(w, per)
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().abs().max() == 448                          # the largest weight lands on e4m3's largest value
    step = per_weight(scale, w.shape)
    error = (w - dequantize(q, scale)).abs()
    assert (error <= torch.maximum(2**-4 * w.abs(), 2**-10 * step) + 1e-6 * w.abs()).all()


def test_requantizing_the_shipped_q4_1_weights_with_groups_of_32_is_lossless(llm):
    w = llm.model.layers[3].mlp.w_down.weight.detach()
    assert torch.allclose(dequantize(*quantize_asymmetric(w, 4, 32)), w, rtol=0, atol=1e-6 * w.abs().max())


@pytest.mark.parametrize("bad, message", [
    (dict(bits=4, per=48), "does not divide the 100 inputs"),
    (dict(bits=4, per="row"), "per must be"),
    (dict(bits=4, per=0), "per must be"),
    (dict(bits=16, per="channel"), "bits must be 2..8"),
])
@pytest.mark.bad_input(kind='quantizer settings that cannot work (bits, per, shapes)', gets='LlmlabError naming the setting')
def test_bad_settings_are_clear_errors(bad, message):
    with pytest.raises(LlmlabError, match=message):
        quantize_symmetric(torch.randn(4, 100), **bad)


# --- packing -------------------------------------------------------------------------------------

def test_int4_packing_puts_column_2j_in_the_low_nibble():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]])
    assert pack_int4(q).tolist() == [[0x21, 0x43], [0x0F, 0xF0]]


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (7, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert pack_int4(q).shape == (7, 48)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_int4_packing_needs_an_even_number_of_columns():
    with pytest.raises(LlmlabError, match="K must be even"):
        pack_int4(torch.zeros(2, 5, dtype=torch.uint8))


# --- the layers and their CPU kernels ------------------------------------------------------------

def activations(k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)  # (batch, seq, K)


@pytest.mark.parametrize("n, k", [(192, 576), (576, 1536)])
def test_int8_cpu_kernel_matches_the_dequantized_matmul(n, k):
    w, x = random_weights(n, k, seed=n), activations(k)
    reference = F.linear(x.float(), dequantize(*quantize_symmetric(w, 8, "channel")))
    assert max_relative_error(Int8Linear(w)(x), reference) < KERNEL_TOLERANCE


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n, k, group_size", [(192, 576, 32), (576, 576, 64), (576, 1536, 128)])
def test_int4_cpu_kernel_matches_the_dequantized_matmul(n, k, group_size, symmetric):
    w, x = random_weights(n, k, seed=k, outlier=1.0), activations(k)
    if symmetric:
        q, scale = quantize_symmetric(w, 4, group_size)
        reference_weight = dequantize(q, scale)
    else:
        reference_weight = dequantize(*quantize_asymmetric(w, 4, group_size))
    layer = Int4Linear(w, group_size, symmetric=symmetric)
    assert max_relative_error(layer(x), F.linear(x.float(), reference_weight)) < KERNEL_TOLERANCE
    if symmetric:   # stored in the one scale/offset form: offset = -8 * scale
        assert torch.equal(layer.offsets, -8 * layer.scales)


def test_the_cpu_int4_kernel_computes_q_minus_8_times_scale_plus_zero():
    """The semantics of scales_and_zeros that Int4Linear converts its offsets to (zero = offset + 8 scale)."""
    g = torch.Generator().manual_seed(0)
    n, k, group_size = 64, 256, 32
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale, zero = torch.rand(k // group_size, n, generator=g) + 0.5, torch.randn(k // group_size, n, generator=g)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)       # (K/group, N, 2)
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    scale, zero = (scales_and_zeros[..., i].float().t().repeat_interleave(group_size, dim=1) for i in (0, 1))
    w = (q - 8) * scale + zero                                                      # (N, K)
    assert max_relative_error(y, x.float() @ w.t()) < KERNEL_TOLERANCE


def test_fp8_layer_matches_the_dequantized_matmul():
    w, x = random_weights(192, 576, seed=2), activations(576)
    reference = F.linear(x.float(), dequantize(*quantize_fp8(w, "channel")))
    assert max_relative_error(Fp8Linear(w)(x), reference) < KERNEL_TOLERANCE


@pytest.mark.parametrize("group_size, message", [(48, "must be one of 32, 64, 128, 256"),
                                                 (256, "does not divide the 576 inputs")])
@pytest.mark.bad_input(kind='an int4 group size the kernel cannot take', gets='LlmlabError listing the sizes')
def test_int4_layer_rejects_group_sizes_the_kernel_cannot_take(group_size, message):
    with pytest.raises(LlmlabError, match=message):
        Int4Linear(torch.randn(64, 576), group_size)


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("seq", [3, 40], ids=["decode-sized", "prefill-sized"])   # int4: kernel / cuBLAS
def test_cuda_layers_match_the_dequantized_matmul(weights, seq):
    if weights == "int4":
        pytest.importorskip("llmlab.kernels.int4_gemv")
    w = random_weights(576, 1536, seed=3).cuda()
    x = torch.randn(2, seq, 1536, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).cuda()
    layer = quantized_linear(w, weights, None, torch.bfloat16)
    assert max_relative_error(layer(x), F.linear(x.float(), layer.dequantize())) < KERNEL_TOLERANCE


# --- the model -----------------------------------------------------------------------------------

def agreement_with(llm, model, ids) -> tuple[float, float]:
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].float()
    reference = llm.logits(ids)
    return top1_agreement(reference, logits), kl_divergence(reference, logits)


@pytest.mark.parametrize("weights, min_top1, max_kl", [("int8", 0.85, 0.02), ("fp8", 0.75, 0.1)])
def test_quantized_model_agrees_with_fp32(llm, hamlet_ids, weights, min_top1, max_kl):
    model = quantize_model(copy.deepcopy(llm.model), weights)
    top1, kl = agreement_with(llm, model, hamlet_ids)
    assert top1 >= min_top1 and kl <= max_kl


def test_quantize_model_swaps_modules_and_leaves_the_model_code_alone(llm):
    model = quantize_model(copy.deepcopy(llm.model), "int8")
    for block in model.layers:
        for part, name in BLOCK_LINEARS:
            assert type(getattr(getattr(block, part), name)) is Int8Linear
    assert type(model.embed) is nn.Embedding and type(model.head) is nn.Linear
    assert model.head.weight is model.embed.weight and model.embed.weight.dtype == torch.bfloat16
    # The swap replaced instances only: the classes, and the model it was copied from, are as they were.
    assert type(Attention(llm.config).wq) is nn.Linear
    assert type(llm.model.layers[0].attention.wq) is nn.Linear and llm.dtype == torch.float32


def test_a_group_size_that_does_not_fit_names_the_layer_and_changes_nothing(llm):
    model = copy.deepcopy(llm.model)
    with pytest.raises(LlmlabError, match=r"layers\.0\.attention\.wq: group size 128 does not divide the 576"):
        quantize_model(model, "int4", group_size=128)
    assert type(model.layers[0].mlp.w_up) is nn.Linear and model.embed.weight.dtype == torch.float32


def test_load_int4_runs_the_shipped_weights_in_bf16(llm, hamlet_ids):
    int4 = llmlab.load(weights="int4")
    assert int4.dtype == torch.bfloat16
    assert type(int4.model.layers[0].mlp.w_down) is Int4Linear and int4.model.layers[0].mlp.w_down.group_size == 32
    top1, kl = agreement_with(llm, int4.model, hamlet_ids)
    assert top1 >= 0.9 and kl <= 0.01
    assert len(list(int4.generate_ids(hamlet_ids[:16], max_new_tokens=4, stop_ids=set()))) == 4


def test_load_weights_and_dtype():
    assert EngineOptions().model_dtype == "fp32"
    assert EngineOptions(weights="bf16").model_dtype == "bf16"
    assert EngineOptions(weights="int8").model_dtype == "bf16"
    assert EngineOptions(weights="int4", dtype="fp32", group_size=64).model_dtype == "fp32"


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="int3"), "weights='int3' is not a valid choice; weights takes one of: fp32, bf16, fp16, int8, int4, fp8"),
    (dict(weights="bf16", dtype="fp32"), "disagree"),
    (dict(weights="int8", group_size=32), "group_size is for weights='int4' only"),
])
@pytest.mark.bad_input(kind='load() with an unknown weight format or group size', gets='LlmlabError before the model loads')
def test_load_rejects_bad_weights_before_loading(kwargs, message):
    with pytest.raises(LlmlabError, match=message):
        llmlab.load(**kwargs)


@pytest.mark.parametrize("weights, group_size, message", [("int2", None, "unknown quantized weights"),
                                                          ("fp8", 32, "int4 weights only")])
def test_quantize_model_rejects_bad_settings(llm, weights, group_size, message):
    with pytest.raises(LlmlabError, match=message):
        quantize_model(llm.model, weights, group_size)


# --- evaluation ----------------------------------------------------------------------------------

def test_a_model_compared_with_itself_agrees_fully_and_scores_its_own_perplexity(llm):
    ids = held_out_ids(llm.tokenizer, 300)
    report = compare(llm, llm, ids, window=128, progress=False)
    assert report["top1_agreement"] == 1.0 and report["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert report["perplexity"] == report["perplexity_reference"] == pytest.approx(perplexity(llm, ids, window=128))


def test_quality_table_scores_formats_against_fp32():
    """fp32 against itself must score KL 0 and agree everywhere; a quantized format or cache must not
    (and must stay close); weight bytes shrink with the format. 300 tokens keep it quick."""
    from llmlab.quant.evaluate import quality_table
    report = quality_table(["fp32", "int8", "kv-int8"], n_tokens=300, window=128, progress=False)
    fp32, int8, kv = (report["results"][name] for name in ("fp32", "int8", "kv-int8"))
    assert fp32["kl_divergence"] == 0 and fp32["top1_agreement"] == 1
    assert fp32["perplexity"] == fp32["perplexity_reference"]
    assert 0 < int8["kl_divergence"] < 0.05 and 0 < kv["kl_divergence"] < 0.05
    assert int8["model_bytes"] < 0.6 * fp32["model_bytes"]
    assert kv["model_bytes"] == fp32["model_bytes"]                    # a cache format: same weights
    with pytest.raises(LlmlabError, match="int4-g32"):
        quality_table(["int4-gx"])


def test_formats_take_more_switches_after_a_plus():
    from llmlab.quant.evaluate import parse_format
    assert parse_format("int4-g32+head=int8") == ({"weights": "int4", "group_size": 32, "head": "int8"}, None)
    assert parse_format("fp32+sparsity=wanda:0.5") == ({"weights": "fp32", "sparsity": "wanda:0.5"}, None)
    assert parse_format("kv-int8") == ({"weights": "fp32"}, "kv-int8")
    with pytest.raises(LlmlabError, match="after '\\+' write one of head, sparsity"):
        parse_format("int8+fused=false")
    with pytest.raises(LlmlabError, match="sparsity must be a fraction"):
        parse_format("fp32+sparsity=wanda:2")


# --- the int8 LM head (head="int8") ----------------------------------------------------------------

def test_int8_head_logits_stay_within_the_quantization_bound():
    """Each int8 weight is off by at most half its row's step (scale_n / 2), so logit n of the int8 head
    is off by at most sum_k |x_k| * scale_n / 2 from the fp32 head's: a bound from the maths, not from
    the code under test (fp32 activations; 1e-5 relative slack for the summation order)."""
    torch.manual_seed(0)
    weight, x = torch.randn(300, 128) * 0.05, torch.randn(4, 128)
    head = Int8Linear(weight, torch.float32)
    bound = x.abs().sum(-1, keepdim=True) * head.scale[None, :] / 2
    error = (head(x) - F.linear(x, weight)).abs()
    assert (error <= bound * (1 + 1e-5) + 1e-6).all()
    assert error.max() > 0                                   # it is quantized: not the same matrix


def test_load_with_an_int8_head_reads_fewer_bytes_and_keeps_a_float_embedding():
    from llmlab.bench.engines import weight_bytes_per_token
    plain = llmlab.load("preset:smollm2-135m", weights="int4")
    small = llmlab.load("preset:smollm2-135m", weights="int4", head="int8")
    assert isinstance(small.model.head, Int8Linear) and small.model.embed.weight.dtype == torch.bfloat16
    saved = (weight_bytes_per_token(plain.model, plain.model.embed)
             - weight_bytes_per_token(small.model, small.model.embed))
    vocab, dim = plain.config.vocab_size, plain.config.dim
    # bf16 (2 bytes) -> int8 (1 byte) per head weight, plus one bf16 scale per row
    assert saved == vocab * dim * 2 - (vocab * dim + vocab * 2)
    assert len(list(small.generate_ids([1, 2, 3], 4))) == 4
