"""Fused projections (one q/k/v matmul, one gate/up matmul per layer) against the plain path.

Stacking weight rows changes no arithmetic: each output element is still the dot product of one
weight row with x, so in fp32 the logits may differ only through the BLAS's blocking of the larger
matrix (summation order, ~1e-6 relative). We allow 1e-4 on logits of size ~20 and measure 0.0 here.
"""

import pytest
import torch
from torch import nn

import llmlab


def test_load_fuses_and_shares_weight_memory(llm):
    attention, mlp = llm.model.layers[0].attention, llm.model.layers[0].mlp
    assert attention.wqkv is not None and mlp.w_gate_up is not None
    # the separate linears are views of the stacked matrix: fusing costs no extra memory
    assert attention.wk.weight.untyped_storage().data_ptr() == attention.wqkv.untyped_storage().data_ptr()
    assert torch.equal(attention.wqkv[attention.wq.out_features:][:attention.wk.out_features], attention.wk.weight)
    assert torch.equal(mlp.w_gate_up[mlp.w_gate.out_features:], mlp.w_up.weight)


@torch.inference_mode()
def test_fused_equals_plain_fp32(llm, shakespeare_text):
    ids = llm.tokenizer.encode(shakespeare_text[3000:8000])[:300]
    fused = llm.logits(ids)
    fused_tokens = list(llm.generate_ids(ids[:40], max_new_tokens=64, stop_ids=set()))
    llm.model.fuse_projections(False)
    try:
        plain = llm.logits(ids)
        plain_tokens = list(llm.generate_ids(ids[:40], max_new_tokens=64, stop_ids=set()))
    finally:
        llm.model.fuse_projections(True)
    assert (fused - plain).abs().max() <= 1e-4
    assert fused_tokens == plain_tokens


@torch.inference_mode()
def test_fused_close_to_plain_bf16(llm, shakespeare_text):
    """In bf16 a different blocking rounds differently (8-bit mantissa: one ulp of a logit near 16 is
    0.125), and 30 layers amplify it: we measured max |diff| ~1 on 300 tokens. What must hold is what
    generation sees: the argmax almost everywhere, and a small KL between the two distributions."""
    half = llmlab.load(dtype="bf16")
    ids = llm.tokenizer.encode(shakespeare_text[3000:8000])[:300]
    fused = half.logits(ids).float()
    half.model.fuse_projections(False)
    plain = half.logits(ids).float()
    agree = (fused.argmax(-1) == plain.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(fused.log_softmax(-1), plain.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert agree >= 0.97 and kl <= 0.01, (agree, kl)


def test_fusing_refuses_modules_that_are_not_plain_linears():
    m = llmlab.load("preset:smollm2-135m", dtype="fp32", fused=False)
    m.model.layers[3].mlp.w_up = nn.Sequential(m.model.layers[3].mlp.w_up)
    with pytest.raises(llmlab.LlmlabError, match="fuse before quantizing"):
        m.model.fuse_projections()


@pytest.mark.gpu
def test_fused_equals_plain_on_cuda():
    m = llmlab.load("preset:llama-3.2-1b", dtype="fp32", device="cuda", fused=False)
    ids = list(range(100, 300))
    plain = m.logits(ids)
    plain_tokens = list(m.generate_ids(ids, 32, stop_ids=set()))
    m.model.fuse_projections()
    assert (m.logits(ids) - plain).abs().max() <= 1e-4
    assert list(m.generate_ids(ids, 32, stop_ids=set())) == plain_tokens


def test_a_fused_model_converts_whole():
    """.to(dtype) must convert the stacked weights with the separate ones, or the fused matmul would
    meet bf16 activations with fp32 weights."""
    m = llmlab.load("preset:smollm2-135m", dtype="fp32")
    m.model.to(torch.bfloat16)
    assert m.model.layers[0].attention.wqkv.dtype == torch.bfloat16
    assert m.model.layers[0].mlp.w_gate_up.dtype == torch.bfloat16
    assert m.logits([1, 2, 3]).isfinite().all()
