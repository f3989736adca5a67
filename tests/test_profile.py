"""The per-stage profiler: it listens to the real forward, so under every eager switch its logits and
tokens must be the engine's exactly; the stages it times must be the ones that ran; its times must
add up; its FLOP counts must match PyTorch's own count and its bytes the weights as stored.

Most tests use a tiny random model of the real architecture (as tests/test_triton_engine.py does),
loaded through `llmlab.load` like any model, so every switch is applied as it is for SmolLM2 and the
Triton kernels run quickly in their CPU interpreter; one test profiles the real SmolLM2 from text.
"""

import contextlib
import time
from collections import Counter

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import llmlab
import llmlab.generate
import llmlab.llm
import llmlab.model
import llmlab.profile
from llmlab import stages
from llmlab.config import PRESETS, ModelConfig, preset
from llmlab.kv_cache import make_cache
from llmlab.profile import (OVERHEAD, STAGES, StageTimer, kv_bytes_per_value, model_stage_costs, profile_batch,
                            profile_generation, stage_costs, stage_weight_bytes)
from llmlab.sampling import SamplingParams, sample_on_device

TINY = ModelConfig(vocab_size=300, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256)
IDS = list(range(5, 25))
SAMPLED = {"temperature": 0.9, "top_k": 50, "repetition_penalty": 1.3, "seed": 7}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model's matmuls are microseconds: a second thread adds only its synchronisation, which
    costs milliseconds when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """tiny(**switches): llmlab.load of TINY with random weights (no tokenizer: its vocabulary is 300)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "tiny-test", TINY)
        patch.setattr(llmlab.llm, "_bundled_tokenizer_or_none", lambda: None)
        yield lambda **switches: llmlab.load("preset:tiny-test", seed=3, **switches)


@pytest.fixture
def sampled_logits(monkeypatch):
    """Every row of logits the sampler is given, by the profiler's loop or the engine's, in order."""
    rows = []

    def recording(logits, *args, **kwargs):
        rows.append(logits.clone())
        return sample_on_device(logits, *args, **kwargs)

    for module in (llmlab.profile, llmlab.generate):
        monkeypatch.setattr(module, "sample_on_device", recording)
    return rows


EAGER_SWITCHES = [{}, {"attention": "naive"}, {"attention": "triton"}, {"kernels": "triton"}, {"fused": False},
                  {"dtype": "bf16"}, {"weights": "int8"}, {"weights": "int4"}, {"weights": "fp8"},
                  {"kv_cache": "paged"}, {"kv_cache": "kv-int8"}, {"kv_cache": "kv-bf16"}]


@pytest.mark.parametrize("switches", EAGER_SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_profile_gives_the_engines_logits_and_tokens_under_every_eager_switch(tiny, sampled_logits, switches):
    """Step for step the profiled loop must hand the sampler the very logits `generate_ids` does (to
    the bit), and draw the same tokens: it runs the same forward, only listened to."""
    model = tiny(**switches)
    profile = profile_generation(model, IDS, 5, SamplingParams(**SAMPLED), stop_ids=set())
    profiled, sampled_logits[:] = list(sampled_logits), []
    tokens = list(model.generate_ids(IDS, 5, stop_ids=set(), **SAMPLED))
    assert profile.token_ids == tokens and len(tokens) == 5
    assert len(profiled) == len(sampled_logits) == 5
    for got, expected in zip(profiled, sampled_logits):
        assert torch.equal(got, expected)


def test_profile_stops_where_the_engine_stops(tiny):
    model = tiny()
    tokens = list(model.generate_ids(IDS, 6, stop_ids=set(), **SAMPLED))
    stop = {tokens[2]}
    profile = profile_generation(model, IDS, 6, SamplingParams(**SAMPLED), stop_ids=stop)
    assert profile.token_ids == list(model.generate_ids(IDS, 6, stop_ids=stop, **SAMPLED))
    assert len(profile.decode_steps) == len(profile.token_ids) - 1


@contextlib.contextmanager
def listened(monkeypatch, kernels: dict):
    """Listen to the stage markers ourselves: count each stage, and note in which stage each of the
    given functions (module -> attribute name) is called."""
    entered, calls, current = Counter(), Counter(), [None]

    @contextlib.contextmanager
    def listener(name):
        entered[name] += 1
        current[0] = name
        yield
        current[0] = None

    def spy(label, function):
        def wrapped(*args, **kwargs):
            calls[label, current[0]] += 1
            return function(*args, **kwargs)
        return wrapped

    for module, names in kernels.items():
        for name in names:
            monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    with stages.listening(listener):
        yield entered, calls


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_stages_that_run_are_the_forwards_own(tiny, monkeypatch, kernels):
    """With kernels="triton" the Triton RoPE, RMSNorm (the first residual add fused in) and SwiGLU
    kernels run inside their stages and PyTorch's RoPE never runs; the residual stage is entered once
    per layer instead of twice. With kernels="torch", no Triton kernel runs."""
    from llmlab.kernels import flash_attention, rms_norm, rope, swiglu
    model = tiny(kernels=kernels, attention="triton" if kernels == "triton" else "sdpa")
    spied = {llmlab.model: ["apply_rope"], rope: ["apply_rope_"], rms_norm: ["rms_norm", "rms_norm_residual"],
             swiglu: ["swiglu"], flash_attention: ["flash_attention"]}
    cache = make_cache("static", TINY, len(IDS), model.dtype, model.device)
    with listened(monkeypatch, spied) as (entered, calls), torch.inference_mode():
        model.model(torch.tensor([IDS]), 0, cache, last_only=True)
    layers = TINY.n_layers
    assert entered == {"embedding": 1, "rope": 1 + layers, "norms": 2 * layers + 1, "qkv_projections": layers,
                       "kv_cache": layers, "attention_core": layers, "output_projection": layers, "mlp": layers,
                       "residual": (1 if kernels == "triton" else 2) * layers, "lm_head": 1}
    if kernels == "triton":
        assert calls == {("apply_rope_", "rope"): layers, ("rms_norm", "norms"): layers + 1,
                         ("rms_norm_residual", "norms"): layers, ("swiglu", "mlp"): layers,
                         ("flash_attention", "attention_core"): layers}
    else:
        assert calls == {("apply_rope", "rope"): 2 * layers}     # q and k of each layer


@pytest.mark.parametrize("switches", [{}, {"kernels": "triton", "attention": "triton"}], ids=["torch", "triton"])
def test_every_stage_of_the_forward_is_timed(tiny, switches):
    profile = profile_generation(tiny(**switches), IDS, 3, stop_ids=set())
    for step in (profile.prefill, *profile.decode_steps):
        assert set(step) == {*STAGES, OVERHEAD}
        assert step["tokenization"] == 0                          # ids given: nothing to tokenize
        assert all(step[name] > 0 for name in STAGES if name != "tokenization"), step


@pytest.mark.parametrize("switches", [{}, {"kernels": "triton", "attention": "triton", "fused": False}],
                         ids=["torch", "triton"])
def test_markers_change_nothing(tiny, switches):
    """With no listener the forward gives the logits it gives with a listener that does nothing, or
    with the profiler's timer listening: bit for bit, prefill and decode."""
    model = tiny(**switches)
    listeners = [None, lambda name: contextlib.nullcontext(), StageTimer(model.device).stage]
    results = []
    for listener in listeners:
        cache = make_cache("static", TINY, len(IDS) + 1, model.dtype, model.device)
        with torch.inference_mode(), (stages.listening(listener) if listener else contextlib.nullcontext()):
            results.append((model.model(torch.tensor([IDS]), 0, cache), model.model(torch.tensor([[7]]), len(IDS), cache)))
    for prefill, decode in results[1:]:
        assert torch.equal(prefill, results[0][0]) and torch.equal(decode, results[0][1])


def test_a_profile_leaves_nothing_listening_even_when_it_fails(tiny):
    model = tiny()
    with pytest.raises(llmlab.LlmlabError, match="context"):
        profile_generation(model, IDS, TINY.max_seq_len)              # prompt + new tokens past the context
    assert stages._listener is None
    profile_generation(model, IDS, 2)
    assert stages._listener is None
    for module in model.model.modules():      # no hooks: the model is never touched
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def test_a_compiled_model_is_refused_with_the_way_to_profile_it(tiny):
    with pytest.raises(llmlab.LlmlabError, match="loaded without them"):
        profile_generation(tiny(compile="default"), IDS, 2)


def test_stage_times_are_non_negative_and_add_up_to_the_wall_time(tiny):
    model = tiny()
    start = time.perf_counter()
    profile = profile_generation(model, IDS, 8, stop_ids=set())
    outside = time.perf_counter() - start
    for step in (profile.prefill, *profile.decode_steps):
        # stages are timed one after another, never nested, so the remainder can't go negative
        assert all(seconds >= 0 for seconds in step.values()), step
    inside = profile.prefill_wall + sum(sum(step.values()) for step in profile.decode_steps)
    # outside the steps there are only a few Python statements and the cost arithmetic: a fixed cost of
    # well under 2 ms, which on this tiny model's 4 ms is more than 10 %, so the slack is 10 % or 2 ms
    assert inside <= outside
    assert outside - inside <= max(0.1 * outside, 2e-3)
    assert len(profile.decode_steps) == len(profile.token_ids) - 1 == 7


def test_profile_batch_times_the_models_stages(tiny):
    prefill_times, decode_times = profile_batch(tiny().model, batch=2, prompt_len=8, decode_steps=2)
    for times in (prefill_times, decode_times):
        assert set(times) == {*STAGES, OVERHEAD}
        assert times["tokenization"] == times["sampling"] == 0
        assert all(times[name] > 0 for name in STAGES if name not in ("tokenization", "sampling"))


def test_format_table_lists_every_stage(tiny):
    table = profile_generation(tiny(), IDS, 3).format_table()
    for name in (*STAGES, OVERHEAD, "tok/s"):
        assert name in table


def test_profile_of_the_real_model_from_text(llm):
    """SmolLM2 from a text prompt: tokenization is timed, and the tokens are the engine's."""
    prompt = "The capital of France is"
    profile = profile_generation(llm, prompt, 4, stop_ids=set())
    assert profile.prompt_len == len(llm.tokenizer.encode(prompt))
    assert profile.prefill["tokenization"] > 0 and all(step["tokenization"] == 0 for step in profile.decode_steps)
    assert profile.token_ids == list(llm.generate_ids(llm.tokenizer.encode(prompt), 4, stop_ids=set()))


# --- FLOPs and bytes ------------------------------------------------------------------------------

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
def test_matmul_flops_match_pytorchs_flop_counter(tiny, n_cached, n_new):
    """The naive backend's matmuls are visible to FlopCounterMode (SDPA's CPU kernel is not), and
    counts 2mnk exactly as we do, so the counts must be equal, not just close. The plain (unfused)
    projections put each matmul in its own module, where the counter can attribute it."""
    model = tiny(attention="naive", fused=False).model
    cache = make_cache("static", TINY, n_cached + n_new, torch.float32, "cpu")
    with torch.inference_mode():
        if n_cached:
            model(torch.arange(1, n_cached + 1)[None], cache=cache, last_only=True)
        with FlopCounterMode(display=False) as counter:
            model(torch.arange(1, n_new + 1)[None], start_pos=n_cached, cache=cache, last_only=True)
    counted = _matmul_flops_by_stage(counter.get_flop_counts(), TINY.n_layers)
    ours = stage_costs(TINY, n_new, n_cached + n_new)
    assert counted["attention_core"] > 0
    assert {name: ours[name].flops for name in counted} == counted


@pytest.mark.parametrize("switches", [{}, {"fused": False}, {"dtype": "bf16"}, {"weights": "int8"}])
@pytest.mark.parametrize("n_new", [1, 9])
def test_weight_bytes_sum_to_the_models_stored_bytes(tiny, switches, n_new):
    """Every weight is read once per step, as stored; the tied embedding is read whole by the LM head,
    plus the n_new rows that the embedding lookup gathers."""
    model = tiny(**switches).model
    # a tied head is one parameter, listed once; fused, the linears are views of the stacked copies
    stored = (sum(p.nbytes for p in model.parameters())
              + sum(b.nbytes for name, b in model.named_buffers() if not name.endswith(("wqkv", "w_gate_up"))))
    costs = model_stage_costs(model)(n_new, n_new)
    row = TINY.dim * model.embed.weight.element_size()
    assert sum(cost.weight_bytes for cost in costs.values()) == stored + n_new * row
    if "weights" not in switches:                      # float weights: the config alone says the same
        assert costs == stage_costs(TINY, n_new, n_new, model.embed.weight.element_size())


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_weights_cost_half_a_byte_plus_their_scales(tiny, group_size):
    """Int4Linear stores 4 bits per weight and, per group of group_size weights, a bf16 scale and a
    bf16 offset: 0.5 + 4 / group_size bytes per weight, about a quarter of bf16's 2."""
    int4, bf16 = (model_stage_costs(tiny(**switches).model)(1, 16)
                  for switches in ({"weights": "int4", "group_size": group_size}, {"dtype": "bf16"}))
    d, hd, layers = TINY.dim, TINY.head_dim, TINY.n_layers
    weights = {"qkv_projections": d * (TINY.n_heads + 2 * TINY.n_kv_heads) * hd,
               "output_projection": TINY.n_heads * hd * d, "mlp": 3 * d * TINY.ffn_dim}
    for name, count in weights.items():
        assert int4[name].weight_bytes == layers * count * (0.5 + 2 * 2 / group_size)
        assert bf16[name].weight_bytes == layers * count * 2
        assert int4[name].weight_bytes / bf16[name].weight_bytes == pytest.approx(0.25 * (1 + 8 / group_size))
    for name in ("embedding", "norms", "lm_head"):     # not quantized: bf16 in both
        assert int4[name] == bf16[name]


def test_int8_weights_cost_a_byte_plus_a_scale_per_row(tiny):
    int8 = stage_weight_bytes(tiny(weights="int8").model)
    d, layers = TINY.dim, TINY.n_layers
    assert int8["mlp"] == layers * (2 * (TINY.ffn_dim * d + 2 * TINY.ffn_dim) + (d * TINY.ffn_dim + 2 * d))


@pytest.mark.parametrize("kind, bytes_per_value", [("static", 4), ("kv-bf16", 2), ("paged", 4),
                                                   ("kv-int8", 1 + 4 / TINY.head_dim)])
def test_kv_cache_bytes_are_the_caches_own(kind, bytes_per_value):
    """The int8 cache stores one byte per value and one fp32 scale per head_dim values."""
    cache = make_cache(kind, TINY, 32, torch.float32, "cpu")
    assert kv_bytes_per_value(cache) == pytest.approx(bytes_per_value)
    costs, plain = stage_costs(TINY, 1, 32, 4, kv_itemsize=bytes_per_value), stage_costs(TINY, 1, 32, 4)
    kv_dim = TINY.n_kv_heads * TINY.head_dim
    assert costs["kv_cache"].activation_bytes == TINY.n_layers * 2 * kv_dim * bytes_per_value
    assert plain["attention_core"].activation_bytes - costs["attention_core"].activation_bytes == pytest.approx(
        TINY.n_layers * 2 * 32 * kv_dim * (4 - bytes_per_value))


def test_a_fused_residual_moves_one_add_into_the_norms():
    """The same FLOPs; the fused kernel writes h and the normed h in one pass, so h is not read back:
    n * dim values fewer per layer."""
    plain, fused = stage_costs(TINY, 5, 5), stage_costs(TINY, 5, 5, fused_residual=True)
    assert fused["residual"].flops == plain["residual"].flops / 2
    assert fused["norms"].flops + fused["residual"].flops == plain["norms"].flops + plain["residual"].flops
    saved = plain["norms"].bytes + plain["residual"].bytes - fused["norms"].bytes - fused["residual"].bytes
    assert saved == TINY.n_layers * 5 * TINY.dim * 4


def test_intensity_of_decode_is_that_of_a_matrix_vector_product():
    """Decode reads each fp32 weight (4 bytes) for 2 FLOPs: intensity ~0.5; prefill of n tokens reuses
    each weight n times."""
    config = preset("smollm2-135m")
    decode, prefill = stage_costs(config, 1, 64), stage_costs(config, 64, 64)
    assert decode["mlp"].intensity == pytest.approx(0.5, rel=0.01)
    assert prefill["mlp"].intensity > 20 * decode["mlp"].intensity


@pytest.mark.gpu
def test_profile_on_cuda_gives_the_engines_tokens():
    # random weights of SmolLM2's shape: the 98 MB model file does not travel to the GPU machines here
    gpu = llmlab.load("preset:smollm2-135m", device="cuda")
    ids = list(range(100, 164))
    profile = profile_generation(gpu, ids, 12, stop_ids=set())
    assert profile.token_ids == list(gpu.generate_ids(ids, 12, stop_ids=set()))
    assert all(seconds >= 0 for name, seconds in profile.prefill.items() if name != OVERHEAD)
    assert all(profile.decode[name] > 0 for name in STAGES if name != "tokenization")
