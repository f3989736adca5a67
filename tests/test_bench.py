"""The benchmark harness works: right run counts, exact token counts, a complete JSON report.

Benchmarks are not tests: nothing here checks a speed, only that speeds are measured as described.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmlab import LlmlabError, bench
from llmlab.config import preset

TINY = bench.BenchSettings(prompt_tokens=16, new_tokens=4, runs=2, warmup=1)


def test_prompt_is_exactly_n_tokens_of_hamlet(llm):
    ids = bench.prompt_ids(llm.tokenizer, 300)
    assert len(ids) == 300
    assert llm.tokenizer.decode(ids).startswith("HAMLET, PRINCE OF DENMARK")


def test_decode_runs_exactly_n_steps_after_one_prefill(llm, hf_model):
    ids = bench.prompt_ids(llm.tokenizer, 8)
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
    ids = bench.prompt_ids(llm.tokenizer, TINY.prompt_tokens)
    results = bench.measure(engines, ids, TINY)
    assert list(results) == ["llmlab", "hf"]
    for r in results.values():
        for key in ("prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"):
            assert len(r[key]) == TINY.runs      # warm-up rounds are not kept
            assert all(x > 0 for x in r[key])
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
    with pytest.raises(LlmlabError, match="peer"):
        bench.run(compare="vllm")


def test_cli_bench_writes_the_report(tmp_path):
    path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "llmlab.cli", "bench", "--prompt-tokens", "16", "--new-tokens", "4", "--runs", "2",
         "--warmup", "0", "--dtype", "bf16", "--threads", "1", "--compare", "hf", "--kv-cache", "static,paged",
         "--json", str(path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "llmlab/hf" in result.stdout
    report = json.loads(path.read_text())
    for key in ("device", "threads", "versions", "model", "dtype", "method", "results", "ratio_llmlab_over_hf",
                "timestamp", "settings", "load_average"):
        assert key in report
    assert report["threads"] == 1 and report["dtype"] == "bf16"
    assert {"python", "torch", "transformers", "llmlab", "numpy"} <= report["versions"].keys()
    assert report["settings"] == {"prompt_tokens": 16, "new_tokens": 4, "runs": 2, "warmup": 0}
    for engine in ("llmlab", "hf"):
        r = report["results"][engine]
        assert len(r["prefill_tok_s"]) == len(r["decode_tok_s"]) == 2
        assert r["prefill_tok_s_median"] > 0 and r["decode_tok_s_median"] > 0
    assert report["ratio_llmlab_over_hf"]["decode"] > 0
    assert len(report["results"]["llmlab-paged"]["decode_tok_s"]) == 2
    assert report["ratio_over_llmlab_static"]["llmlab-paged"]["decode"] > 0 and "llmlab-paged/llmlab" in result.stdout


def test_weight_formats_are_measured_in_the_same_rounds():
    report = bench.run(None, dtype="bf16", settings=TINY, threads=1, weights=("fp32", "int8"))
    assert list(report["results"]) == ["llmlab", "llmlab-int8"]
    assert report["weights"] == ["fp32", "int8"]
    assert report["ratio_over_llmlab_static"]["llmlab-int8"]["decode"] > 0
    with pytest.raises(LlmlabError, match="unknown weights"):
        bench.run(None, settings=TINY, weights=("int3",))


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
