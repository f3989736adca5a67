"""The benchmark harness works: right run counts, exact token counts, a complete JSON report.

Benchmarks are not tests: nothing here checks a speed, only that speeds are measured as described.
The graph-ready (compiled) engine is measured on a tiny model of the real architecture, written as a
Hugging Face folder: compiling the 30-layer SmolLM2 takes a minute or more on a CI CPU.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llmlab
from llmlab import LlmlabError, bench
from llmlab.bench.gptfast import GptFastEngine, model_args
from llmlab.config import ModelConfig, preset
from llmlab.corpus import prompt_ids
from llmlab.options import EngineOptions
from llmlab.tokenizer import bytes_to_unicode

TINY = bench.BenchSettings(prompt_tokens=16, new_tokens=4, runs=2, warmup=1)
TINY_SHAPE = {"vocab_size": 258, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama with random weights as a Hugging Face folder; its tokenizer spells text in bytes
    (256 byte tokens, no merges, two control tokens)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", **TINY_SHAPE, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": True}))
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    specials = [{"id": 256, "content": "<|im_start|>", "special": True},
                {"id": 257, "content": "<|im_end|>", "special": True}]
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []}, "decoder": {"type": "ByteLevel"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}]},
        "added_tokens": specials}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    d, ffn, heads, kv = (TINY_SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                 "num_key_value_heads"))
    kv_dim = kv * d // heads
    layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv_dim, d),
             "self_attn.v_proj.weight": (kv_dim, d), "self_attn.o_proj.weight": (d, d),
             "mlp.gate_proj.weight": (ffn, d), "mlp.up_proj.weight": (ffn, d), "mlp.down_proj.weight": (d, ffn)}
    shapes = {"model.embed_tokens.weight": (TINY_SHAPE["vocab_size"], d), "model.norm.weight": (d,)}
    shapes |= {f"model.layers.{i}.{name}": shape for i in range(TINY_SHAPE["num_hidden_layers"])
               for name, shape in layer.items()}
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=generator)
               for name, shape in shapes.items()}, folder / "model.safetensors")
    return str(folder)


def test_decode_runs_exactly_n_steps_after_one_prefill(llm, hf_model):
    ids = prompt_ids(llm.tokenizer, 8)
    for engine, module in ((bench.LlmlabEngine(llm), llm.model), (bench.HFEngine(hf_model, torch.device("cpu")), hf_model)):
        calls = []
        hook = module.register_forward_hook(lambda *_: calls.append(1))
        try:
            assert engine.decode_seconds(ids, 5) > 0
            assert len(calls) == 1 + 5              # never stops early at an end-of-text token
            assert engine.prefill_seconds(ids) > 0
            assert len(calls) == 1 + 5 + 1
        finally:
            hook.remove()


def test_measure_keeps_every_timed_run_and_their_medians(llm, hf_model):
    engines = [bench.LlmlabEngine(llm), bench.HFEngine(hf_model, torch.device("cpu"))]
    ids = prompt_ids(llm.tokenizer, TINY.prompt_tokens)
    results = bench.measure(engines, ids, TINY)
    assert list(results) == ["llmlab", "hf"]
    for r in results.values():
        for key in ("prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"):
            assert len(r[key]) == TINY.runs      # warm-up rounds are not kept
            assert all(x > 0 for x in r[key])
        assert r["decode_tokens"] == TINY.new_tokens
        assert r["prefill_tok_s"][0] == pytest.approx(TINY.prompt_tokens / r["prefill_s"][0])
        assert r["decode_tok_s"][0] == pytest.approx(TINY.new_tokens / r["decode_s"][0])
        assert min(r["decode_tok_s"]) <= r["decode_tok_s_median"] <= max(r["decode_tok_s"])


def test_tokenizer_benchmark_times_both_tokenizers(llm, gguf_path):
    hf_tokenizer = bench.load_hf_tokenizer(str(gguf_path))
    result = bench.tokenizer_benchmark(llm.tokenizer, hf_tokenizer, n_bytes=20_000, runs=2)
    assert result["n_bytes"] == 20_000
    for name in ("llmlab", "llmlab_cold", "hf"):
        assert len(result[name]["seconds"]) == 2 and result[name]["seconds_median"] > 0
    # the two tokenizers differ only in rare whitespace-before-digit cases (see tokenizer.py)
    assert abs(result["llmlab"]["n_tokens"] - result["hf"]["n_tokens"]) < 0.01 * result["hf"]["n_tokens"]
    assert result["ratio_llmlab_over_hf"] > 0 and result["ratio_llmlab_cold_over_hf"] > 0


def test_bad_settings_are_refused():
    with pytest.raises(LlmlabError, match="runs"):
        bench.BenchSettings(runs=0)
    with pytest.raises(LlmlabError, match="new_tokens"):
        bench.BenchSettings(new_tokens=0)
    with pytest.raises(LlmlabError, match="context"):
        bench.BenchSettings(prompt_tokens=8000, new_tokens=500).check(preset("smollm2-135m"))
    with pytest.raises(LlmlabError, match="context"):      # 8188 + 4 rounded up to whole 8-step graphs
        bench.BenchSettings(prompt_tokens=8188, new_tokens=4).check(preset("smollm2-135m"), steps_per_graph=8)
    with pytest.raises(LlmlabError, match="peer"):
        bench.run(compare="vllm")
    with pytest.raises(LlmlabError, match="EngineOptions"):
        bench.run(engines=[{"compile": "default"}])


def test_two_engines_of_the_same_name_are_refused():
    # refused before anything is loaded: the results, keyed by name, would overwrite each other
    with pytest.raises(LlmlabError, match=r"both llmlab\[kv_cache=paged\]"):
        bench.run(engines=[EngineOptions(), EngineOptions(kv_cache="paged"), EngineOptions(kv_cache="paged")])
    with pytest.raises(LlmlabError, match="both llmlab:"):   # fused=True is the default: the same engine
        bench.run(engines=[EngineOptions(), EngineOptions(fused=True)])


def test_cli_bench_writes_the_report(tmp_path):
    path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "llmlab.cli", "bench", "--prompt-tokens", "16", "--new-tokens", "4", "--runs", "2",
         "--warmup", "0", "--dtype", "bf16", "--threads", "1", "--compare", "hf", "--kv-cache", "static,paged",
         "--json", str(path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "baseline / hf" in result.stdout
    report = json.loads(path.read_text())
    for key in ("device", "threads", "versions", "model", "dtype", "method", "results", "ratio_llmlab_over_hf",
                "timestamp", "settings", "load_average", "engines", "weight_bytes_per_token"):
        assert key in report
    assert report["threads"] == 1 and report["dtype"] == "bf16"
    assert {"python", "torch", "transformers", "llmlab", "numpy"} <= report["versions"].keys()
    assert report["settings"] == {"prompt_tokens": 16, "new_tokens": 4, "runs": 2, "warmup": 0, "batch": 1}
    static, paged = "llmlab[dtype=bf16]", "llmlab[dtype=bf16,kv_cache=paged]"
    assert list(report["results"]) == [static, paged, "hf"]
    assert report["engines"][paged] == {**EngineOptions(dtype="bf16", kv_cache="paged").as_dict()}
    for engine in (static, "hf"):
        r = report["results"][engine]
        assert len(r["prefill_tok_s"]) == len(r["decode_tok_s"]) == 2
        assert r["prefill_tok_s_median"] > 0 and r["decode_tok_s_median"] > 0
    assert report["ratio_llmlab_over_hf"]["decode"] == pytest.approx(
        report["results"][static]["decode_tok_s_median"] / report["results"]["hf"]["decode_tok_s_median"])
    assert report["ratio_over_baseline"][paged]["decode"] > 0 and f"{paged} / baseline" in result.stdout
    # the same weights read per token by both engines (the HF peer too): SmolLM2's parameters in bf16,
    # its tied table counted once (as the head), plus one embedding row
    config = preset("smollm2-135m")
    assert set(report["weight_bytes_per_token"].values()) == {2 * (config.n_params() + config.dim)}


def test_weight_formats_are_measured_in_the_same_rounds():
    report = bench.run(None, engines=[EngineOptions(weights="bf16"), EngineOptions(weights="int8")],
                       settings=TINY, threads=1)
    assert list(report["results"]) == ["llmlab[weights=bf16]", "llmlab[weights=int8]"]
    assert report["engines"]["llmlab[weights=int8]"]["model_dtype"] == "bf16"
    assert report["ratio_over_baseline"]["llmlab[weights=int8]"]["decode"] > 0
    bytes_per_token = report["weight_bytes_per_token"]
    # int8 linears: 1 byte a weight and a bf16 scale per row, against 2 bytes a weight
    assert 0.5 < bytes_per_token["llmlab[weights=int8]"] / bytes_per_token["llmlab[weights=bf16]"] < 0.8


def test_graph_ready_engine_is_timed_through_the_decoder_with_compile_seconds(tiny_model):
    """compile="default" on CPU, 2 steps per compiled call: 3 new tokens are rounded up to 4 tokens made,
    and the compile is measured cold (built into an empty cache) and warm (read back from it)."""
    eager, graph = "llmlab", "llmlab[compile=default,steps_per_graph=2]"
    settings = bench.BenchSettings(prompt_tokens=12, new_tokens=3, runs=2, warmup=0)
    report = bench.run(tiny_model, engines=[EngineOptions(), EngineOptions(compile="default", steps_per_graph=2)],
                       settings=settings, threads=1, roofline=True, launches=True)
    assert list(report["results"]) == [eager, graph]
    assert report["engines"][graph]["compile"] == "default" and report["engines"][graph]["steps_per_graph"] == 2
    assert report["results"][eager]["decode_tokens"] == 3 and report["results"][graph]["decode_tokens"] == 4
    r = report["results"][graph]
    assert r["decode_tok_s"] == pytest.approx([4 / s for s in r["decode_s"]])
    compiled = report["compile_seconds"]
    assert list(compiled) == [graph]                       # the eager engine compiles nothing
    assert compiled[graph]["cold"] > 0 and compiled[graph]["warm"] > 0
    assert compiled[graph]["fxgraph_cache_miss_cold"] >= 1 and compiled[graph]["fxgraph_cache_hit"] >= 1
    config = ModelConfig(vocab_size=258, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    assert report["weight_bytes_per_token"] == {eager: 4 * (config.n_params() + 64), graph: 4 * (config.n_params() + 64)}
    copy = report["roofline"]["peaks"]["copy_bandwidth"]
    for name in (eager, graph):
        assert report["decode_bandwidth_fraction"][name] == pytest.approx(
            report["weight_bytes_per_token"][name] * report["results"][name]["decode_tok_s_median"] / copy)
        assert report["launches"][name]["kernels_per_step"] > 0
    assert report["roofline"]["engine"] == eager
    assert f"compile {graph}" in bench.format_table(report)


def test_graph_decode_makes_the_greedy_tokens_it_times(tiny_model):
    """The timed path is the generation path: after decode_seconds(ids, 3) with 2 steps per call, the
    decoder has made 4 tokens, the same as the eager greedy loop's."""
    llm = llmlab.load(tiny_model, compile="default", steps_per_graph=2)
    engine = bench.LlmlabEngine(llm)
    ids = prompt_ids(llm.tokenizer, 12)
    assert engine.decode_seconds(ids, 3) > 0
    decoder = engine.decoder(len(ids) + 4)
    assert decoder.pos.tolist() == [len(ids) + 4]          # 4 steps after the prompt and the first token
    expected = list(llmlab.load(tiny_model).generate_ids(ids, 5, stop_ids=set()))
    assert decoder.out[0].tolist() == expected[3:5]        # the last call's 2 tokens


def test_gpt_fast_model_args_match_its_own_named_configs():
    # gpt-fast's model.py `transformer_configs["llama-3-8b"]` (read from github.com/pytorch-labs/gpt-fast)
    gpt_fast_llama_3_8b = dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                               intermediate_size=14336, vocab_size=128256, rope_base=500000)
    args = model_args(preset("llama-3-8b"))
    assert {k: args[k] for k in gpt_fast_llama_3_8b} == gpt_fast_llama_3_8b
    assert args["norm_eps"] == 1e-5 and args["dim"] // args["n_head"] == preset("llama-3-8b").head_dim
    small = model_args(preset("smollm2-135m"))     # 9 query heads, 3 KV heads: head_dim 64 as in llmlab
    assert (small["n_head"], small["n_local_heads"], small["dim"] // small["n_head"]) == (9, 3, 64)


def test_gpt_fast_model_of_a_presets_shape_has_its_parameters():
    """gpt-fast's own Transformer (its model.py, where it was exported; built on the meta device, so no
    GPU or memory is needed) from model_args has exactly the preset's parameters, plus its untied head."""
    path = Path(bench.gptfast.DEFAULT_DIR) / "model.py"
    if not path.is_file():
        pytest.skip(f"gpt-fast is not exported into {path.parent} (llmlab/bench/gptfast.py says how)")
    spec = importlib.util.spec_from_file_location("gpt_fast_model", path)
    gpt_fast = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpt_fast)
    for name in ("smollm2-135m", "llama-3.2-1b", "llama-3-8b"):
        config = preset(name)
        with torch.device("meta"):
            model = gpt_fast.Transformer(gpt_fast.ModelArgs(**model_args(config)))
        untied_head = config.vocab_size * config.dim if config.tie_embeddings else 0
        assert sum(p.numel() for p in model.parameters()) == config.n_params() + untied_head
        assert model.config.head_dim == config.head_dim


def test_gpt_fast_peer_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(LlmlabError, match="CUDA GPU only"):
        GptFastEngine(tmp_path, preset("smollm2-135m"), torch.device("cpu"), 256)
    with pytest.raises(LlmlabError, match="CUDA GPU only"):
        bench.run("preset:smollm2-135m", compare="gpt-fast", gpt_fast_dir=tmp_path)
    if torch.cuda.is_available():
        with pytest.raises(LlmlabError, match="archive HEAD model.py generate.py"):
            GptFastEngine(tmp_path, preset("smollm2-135m"), torch.device("cuda"), 256)


@pytest.mark.gpu
def test_gpt_fast_peer_decodes_in_the_same_rounds():
    pytest.importorskip("sentencepiece")
    pytest.importorskip("tiktoken")
    folder = bench.gptfast.DEFAULT_DIR
    if not (Path(folder) / "model.py").is_file():      # a peer the user exports (llmlab/bench/gptfast.py says how)
        pytest.skip(f"gpt-fast is not exported to {folder}")
    settings = bench.BenchSettings(prompt_tokens=32, new_tokens=8, runs=2, warmup=0)
    report = bench.run("preset:smollm2-135m", engines=[EngineOptions(dtype="bf16")], device="cuda",
                       compare="gpt-fast", gpt_fast_dir=folder, settings=settings)
    assert list(report["results"]) == ["llmlab[dtype=bf16]", "gpt-fast"]
    assert report["results"]["gpt-fast"]["decode_tok_s_median"] > 0
    assert report["gpt_fast"]["first_call_seconds"] > 0
    # the same shape in bf16: the same weight bytes per token (gpt-fast's head is untied, read the same)
    assert report["weight_bytes_per_token"]["gpt-fast"] == report["weight_bytes_per_token"]["llmlab[dtype=bf16]"]


def test_llamacpp_peer_needs_its_extra_and_a_gguf(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)            # as if the [peers] extra were absent
    with pytest.raises(LlmlabError, match=r"pip install -e '\.\[peers\]'"):
        bench.LlamaCppEngine("model.gguf", 64, 1)
    monkeypatch.undo()
    pytest.importorskip("llama_cpp")
    with pytest.raises(LlmlabError, match="runs a .gguf file"):
        bench.LlamaCppEngine(str(tmp_path), 64, 1)


def test_llamacpp_peer_runs_the_same_file_greedily(llm, gguf_path):
    """llama.cpp is an independent engine on the same Q4_1 file (it multiplies against 8-bit-quantized
    activations, so its logits differ slightly): its greedy first token must still be llmlab's."""
    pytest.importorskip("llama_cpp")
    engine = bench.LlamaCppEngine(str(gguf_path), 128, 2)
    ids = llm.tokenizer.encode("The capital of France is")
    assert engine.prefill_seconds(ids) > 0
    ours = llm.logits(ids)[-1]
    assert engine._next_token() == int(ours.argmax())
    # logits of size ~20; 8-bit activations move them by a few tenths, a wrong model by far more
    assert np.abs(engine.last_logits() - ours.numpy()).max() < 2.0
    assert engine.decode_seconds(ids, 5) > 0 and engine.model.n_tokens == len(ids) + 5


def test_a_batch_is_timed_row_by_row_through_the_decoder(tiny_model):
    """--batch 3: every row decodes the same prompt through one Decoder of batch 3, and tok/s counts
    every row's tokens (3 rows x 4 tokens made)."""
    settings = bench.BenchSettings(prompt_tokens=12, new_tokens=3, runs=1, warmup=0, batch=3)
    name = "llmlab[compile=default,steps_per_graph=2]"
    report = bench.run(tiny_model, engines=[EngineOptions(compile="default", steps_per_graph=2)], settings=settings,
                       threads=1)
    r = report["results"][name]
    assert report["batch"] == 3 and r["decode_tokens"] == 12
    assert r["decode_tok_s"] == pytest.approx([12 / s for s in r["decode_s"]])
    llm = llmlab.load(tiny_model, compile="default", steps_per_graph=2)
    engine = bench.LlmlabEngine(llm, batch=3)
    ids = prompt_ids(llm.tokenizer, 12)
    engine.decode_seconds(ids, 3)
    out = engine.decoder(len(ids) + 4).out
    assert out.shape == (3, 2) and (out == out[0]).all()          # the same prompt, greedy: the same tokens per row


@pytest.mark.bad_input(kind="bench --batch above 1 for an eager engine or a CPU peer",
                       gets="LlmlabError: which engines decode a batch, and the switches that make one graph-ready")
def test_a_batch_needs_a_graph_ready_engine(llm):
    with pytest.raises(LlmlabError, match="fixed-shape step"):
        bench.LlmlabEngine(llm, batch=2)
    with pytest.raises(LlmlabError, match="batch"):
        bench.BenchSettings(batch=0)
