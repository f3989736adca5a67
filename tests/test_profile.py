"""The per-stage profiler: it runs the real model's own modules, so its tokens and logits must be the
engine's exactly; its times must add up; its FLOP counts must match PyTorch's own count."""

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmlab.kv_cache import KVCache
from llmlab.profile import OVERHEAD, STAGES, StageTimer, profile_generation, profiled_forward, stage_costs
from llmlab.sampling import SamplingParams

PROMPT = "The capital of France is"


def test_profiled_forward_gives_the_models_logits_exactly(llm):
    """Prefill and one decode step, each against Transformer.forward with its own cache: the same
    operations in the same order, so equal to the bit."""
    ids = llm.tokenizer.encode(PROMPT)
    caches = [KVCache(llm.config, len(ids) + 1) for _ in range(2)]
    timer = StageTimer(llm.device)
    with torch.inference_mode():
        for start_pos, tokens in ((0, torch.tensor([ids])), (len(ids), torch.tensor([[42]]))):
            expected = llm.model(tokens, start_pos=start_pos, cache=caches[0], last_only=True)
            got = profiled_forward(llm.model, tokens, start_pos, caches[1], timer)
            assert torch.equal(got, expected)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 40, "seed": 3}])
def test_profiled_generation_gives_the_engines_tokens(llm, sampling):
    ids = llm.tokenizer.encode(PROMPT)
    profile = profile_generation(llm, PROMPT, 12, SamplingParams(**sampling))
    assert profile.prompt_len == len(ids)
    assert profile.token_ids == list(llm.generate_ids(ids, 12, **sampling))


def test_stage_times_are_non_negative_and_add_up_to_the_wall_time(llm):
    start = time.perf_counter()
    profile = profile_generation(llm, PROMPT, 8)
    outside = time.perf_counter() - start
    for step in (profile.prefill, *profile.decode_steps):
        assert set(step) == {*STAGES, OVERHEAD}
        # stages are timed one after another, never nested, so the remainder can't go negative
        assert all(seconds >= 0 for seconds in step.values()), step
    assert profile.prefill["tokenization"] > 0 and profile.decode["tokenization"] == 0
    inside = profile.prefill_wall + sum(sum(step.values()) for step in profile.decode_steps)
    # 5 %: outside the steps there are only a few Python statements and the cost arithmetic
    assert inside == pytest.approx(outside, rel=0.05)
    assert len(profile.decode_steps) == len(profile.token_ids) - 1 == 7


def _matmul_flops_by_stage(counts: dict, n_layers: int) -> dict[str, int]:
    """FlopCounterMode's per-module totals (it counts matmuls only) grouped into the profiler's stages."""
    def total(name):
        return sum(counts.get(f"Transformer.{name}", {}).values())

    def layers(*names):
        return sum(total(f"layers.{i}.{name}") for i in range(n_layers) for name in names)

    projections = layers("attention.wq", "attention.wk", "attention.wv")
    return {
        "qkv_projections": projections,
        "output_projection": layers("attention.wo"),
        "attention_core": layers("attention") - projections - layers("attention.wo"),
        "mlp": layers("mlp"),
        "lm_head": total("head"),
    }


@pytest.mark.parametrize("n_cached, n_new", [(0, 7), (7, 1)], ids=["prefill", "decode"])
def test_matmul_flops_match_pytorchs_flop_counter(llm, n_cached, n_new):
    """The naive backend's matmuls are visible to FlopCounterMode (SDPA's CPU kernel is not), and
    counts 2mnk exactly as we do, so the counts must be equal, not just close. The plain (unfused)
    projections put each matmul in its own module, where the counter can attribute it."""
    llm.model.set_attention("naive")
    llm.model.fuse_projections(False)
    cache = KVCache(llm.config, n_cached + n_new)
    try:
        with torch.inference_mode():
            if n_cached:
                llm.model(torch.arange(1, n_cached + 1)[None], cache=cache, last_only=True)
            with FlopCounterMode(display=False) as counter:
                llm.model(torch.arange(1, n_new + 1)[None], start_pos=n_cached, cache=cache, last_only=True)
    finally:
        llm.model.set_attention("sdpa")
        llm.model.fuse_projections(True)
    counted = _matmul_flops_by_stage(counter.get_flop_counts(), llm.config.n_layers)
    ours = stage_costs(llm.config, n_new, n_cached + n_new)
    assert counted["attention_core"] > 0
    assert {name: ours[name].flops for name in counted} == counted


@pytest.mark.parametrize("n_new", [1, 9])
def test_weight_bytes_sum_to_the_models_parameter_bytes(llm, n_new):
    """Every weight is read once per step; the tied embedding is read whole by the LM head, plus the
    n_new rows that the embedding lookup gathers."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())  # tied: once
    costs = stage_costs(llm.config, n_new, n_new)
    assert sum(cost.weight_bytes for cost in costs.values()) == parameter_bytes + n_new * llm.config.dim * 4


def test_intensity_of_decode_is_that_of_a_matrix_vector_product(llm):
    """Decode reads each fp32 weight (4 bytes) for 2 FLOPs: intensity ~0.5; prefill of n tokens reuses
    each weight n times."""
    decode, prefill = stage_costs(llm.config, 1, 64), stage_costs(llm.config, 64, 64)
    assert decode["mlp"].intensity == pytest.approx(0.5, rel=0.01)
    assert prefill["mlp"].intensity > 20 * decode["mlp"].intensity


def test_profiling_leaves_the_model_untouched(llm):
    """Profiling off costs nothing because profiling never changes the model: no hooks, same backend."""
    profile_generation(llm, list(llm.tokenizer.encode(PROMPT)), 2)
    for module in llm.model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
    assert all(block.attention.backend == "sdpa" for block in llm.model.layers)


def test_format_table_lists_every_stage(llm):
    table = profile_generation(llm, PROMPT, 3).format_table()
    for name in (*STAGES, OVERHEAD, "tok/s"):
        assert name in table


@pytest.mark.gpu
def test_profile_on_cuda_gives_the_engines_tokens():
    import llmlab
    # random weights of SmolLM2's shape: the 98 MB model file does not travel to the GPU machines here
    gpu = llmlab.load("preset:smollm2-135m", device="cuda")
    ids = list(range(100, 164))
    profile = profile_generation(gpu, ids, 12, stop_ids=set())
    assert profile.token_ids == list(gpu.generate_ids(ids, 12, stop_ids=set()))
    assert all(seconds >= 0 for name, seconds in profile.prefill.items() if name != OVERHEAD)
