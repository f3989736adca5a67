"""The engine's Triton switches (attention="triton", kernels="triton") against its PyTorch path.

On CPU the kernels run in Triton's interpreter, so the model is a tiny one of the real architecture
(grouped-query heads, head_dim 32, tied head) with random weights; on a GPU, a real-shape preset.
fp32 tolerance: the kernels reduce in a different order (RMSNorm's mean, the online softmax), ~1e-6
relative per op; 1e-4 on logits of size ~1 leaves room for that and none for a real bug (a wrong
mask, a missed rescale, a swapped rotation give errors of order 0.1-1).
"""

import pytest
import torch

import llmlab
from llmlab.config import ModelConfig
from llmlab.generate import generate_tokens
from llmlab.llm import random_model

TINY = ModelConfig(vocab_size=300, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256)


def tiny_pair(fused: bool = True):
    """The same random weights twice: PyTorch's path and the Triton one."""
    plain, triton = (random_model(TINY, torch.float32, torch.device("cpu"), seed=3) for _ in range(2))
    for model in (plain, triton):
        model.fuse_projections(fused)
    triton.set_attention("triton")
    triton.set_kernels("triton")
    return plain, triton


@torch.inference_mode()
def test_triton_prefill_matches_pytorch_on_cpu():
    plain, triton = tiny_pair()
    tokens = torch.randint(0, TINY.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    assert (triton(tokens) - plain(tokens)).abs().max() <= 1e-4


def test_triton_greedy_tokens_match_pytorch_on_cpu():
    """Prefill through FlashAttention, then decode steps through split-K decode attention, over the cache."""
    plain, triton = tiny_pair(fused=False)
    prompt = list(range(5, 25))
    with torch.inference_mode():
        ours = list(generate_tokens(triton, prompt, 6))
        reference = list(generate_tokens(plain, prompt, 6))
    assert ours == reference


def test_unknown_switch_values_are_refused():
    with pytest.raises(llmlab.LlmlabError, match="attention='flash' is not a valid choice; attention takes one of: naive, sdpa, triton"):
        llmlab.load("preset:smollm2-135m", attention="flash")
    with pytest.raises(llmlab.LlmlabError, match="kernels='cuda' is not a valid choice; kernels takes one of: torch, triton"):
        llmlab.load("preset:smollm2-135m", kernels="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_engine_on_cuda(dtype):
    plain = llmlab.load("preset:smollm2-135m", dtype=dtype, device="cuda", seed=1)
    triton = llmlab.load("preset:smollm2-135m", dtype=dtype, device="cuda", seed=1, attention="triton",
                         kernels="triton")
    ids = list(range(100, 400))
    # random N(0, 0.02) weights give logits of size ~0.5; bf16 rounds each op to 3 significant digits
    assert (triton.logits(ids) - plain.logits(ids)).abs().max() <= {"fp32": 1e-3, "bf16": 0.1}[dtype]
    if dtype == "fp32":
        assert list(triton.generate_ids(ids, 32, stop_ids=set())) == list(plain.generate_ids(ids, 32, stop_ids=set()))
