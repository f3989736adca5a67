"""llmlab bench-serve (llmlab.bench.serving) measures what it says, on a tiny trace (five requests of a few tokens).

A benchmark is not a test: nothing here checks a speed. What is checked: the trace is the same for a
seed, stays within its bounds and fits the model; every engine makes exactly the tokens asked for and the
figures are computed from them as the method says; the C = 1 runs serve the first requests only; the
scheduler's greedy tokens are batch-1's; the switch sets reach their models and the report; bad
arguments are refused before anything is loaded.
"""

import dataclasses
import json
import statistics
import subprocess
import sys

import pytest

from llmlab.bench import serving
from llmlab.bench.serving import (MAX_REQUESTS, ServingSettings, TraceSettings, main, make_trace, measure,
                                  new_scheduler, ratios, serve)
from llmlab.errors import LlmlabError
from llmlab.options import EngineOptions

TINY = TraceSettings(n_requests=5, prompt_tokens=(8, 40), output_tokens=(2, 5), shared_prefix=8,
                     shared_fraction=0.6, seed=0)     # three of the five share the opening
TINY_ARGS = ["--requests", "3", "--prompt-tokens", "8", "24", "--output-tokens", "2", "4", "--shared-prefix", "8",
             "--concurrency", "1,2", "--runs", "1", "--block-size", "4", "--batch1-requests", "2"]


def test_the_trace_is_the_same_for_a_seed_and_within_its_bounds(llm):
    trace = make_trace(llm.tokenizer, TINY, llm.config)
    assert trace == make_trace(llm.tokenizer, TINY, llm.config)
    assert trace != make_trace(llm.tokenizer, dataclasses.replace(TINY, seed=2), llm.config)
    assert all(8 <= len(r.prompt) <= 40 and 2 <= r.max_new_tokens <= 5 and r.arrival is None for r in trace)
    opening = tuple(llm.tokenizer.encode(serving.held_out_text())[:8])
    assert any(r.shared for r in trace) and not all(r.shared for r in trace)
    assert all((r.prompt[:8] == opening) == r.shared for r in trace)
    # open loop: the same requests, arriving as a Poisson process (exponential gaps of mean 1 / rate)
    timed = make_trace(llm.tokenizer, dataclasses.replace(TINY, rate=4.0), llm.config)
    assert [dataclasses.replace(r, arrival=None) for r in timed] == trace
    assert 0 < timed[0].arrival < timed[1].arrival < timed[-1].arrival
    many = make_trace(llm.tokenizer, dataclasses.replace(TINY, n_requests=MAX_REQUESTS, rate=4.0), llm.config)
    assert many[-1].arrival / len(many) == pytest.approx(0.25, rel=0.1)


def test_a_speeches_trace_asks_for_as_many_tokens_as_the_speech_that_follows_its_prompt(llm):
    """Each prompt ends with a speaker's name; found in the play's text by its last 40 tokens, the speech
    that follows (up to the next name, found here with its own search) has as many tokens as the request
    asks for, held within --output-tokens."""
    settings = dataclasses.replace(TINY, n_requests=12, prompt_tokens=(60, 80), output_tokens=(3, 30),
                                   lengths="speeches")     # 40 tokens past the shared opening: found only once
    trace, text = make_trace(llm.tokenizer, settings, llm.config), serving.held_out_text()
    assert trace == make_trace(llm.tokenizer, settings, llm.config)
    for request in trace:
        tail = llm.tokenizer.decode(list(request.prompt[-40:]))
        assert any(name.end() == len(tail) for name in serving.SPEECH.finditer(tail)), tail
        start = text.index(tail) + len(tail)
        end = serving.SPEECH.search(text, start).start()
        n_speech = len(llm.tokenizer.encode(text[start:end]))
        assert request.max_new_tokens == min(max(n_speech, 3), 30)
    assert len({r.max_new_tokens for r in trace}) > 3     # lengths vary, as speeches do


@pytest.mark.bad_input(kind="serving bench: a trace the model cannot run (token ids past its vocabulary, requests "
                            "longer than its context)", gets="LlmlabError naming the ids or the length")
def test_a_trace_the_model_cannot_run_is_refused(llm):
    with pytest.raises(LlmlabError, match="the tokenizer does not fit this model"):
        make_trace(llm.tokenizer, TINY, dataclasses.replace(llm.config, vocab_size=256))
    with pytest.raises(LlmlabError, match="more than the model's context of 40"):
        make_trace(llm.tokenizer, TINY, dataclasses.replace(llm.config, max_seq_len=40))


def test_every_figure_is_computed_from_exactly_the_tokens_asked_for(llm, hf_model):
    """Two rounds of every engine at C = 1 (the first three requests) and C = 3 (all five): tokens counted
    = the trace's outputs, tok/s = tokens / seconds, p50 <= p99, medians of the rounds; the scheduler's
    tokens are batch-1's; the shared opening hits the prefix cache."""
    trace = make_trace(llm.tokenizer, TINY, llm.config)
    settings = ServingSettings(concurrency=(1, 3), runs=2, batch1_requests=3, block_size=4)
    results = measure({"batch-1": llm, "scheduler": llm, "hf": hf_model}, trace, settings)
    asked = {1: sum(r.max_new_tokens for r in trace[:3]), 3: sum(r.max_new_tokens for r in trace)}
    assert sorted(results) == ["batch-1", "hf", "scheduler"]
    assert list(results["batch-1"]) == ["1"] and list(results["scheduler"]) == list(results["hf"]) == ["1", "3"]
    for engine, by_c in results.items():
        for c, entry in by_c.items():
            assert len(entry["runs"]) == 2
            for run in entry["runs"]:
                assert run["output_tokens"] == asked[int(c)]
                assert run["output_tok_s"] == pytest.approx(asked[int(c)] / run["seconds"])
                assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"] and 0 < run["tpot_p50_s"] <= run["tpot_p99_s"]
                assert run["peak_kv_tokens"] > 0 and run["forwards"] >= max(r.max_new_tokens for r in trace[:3])
                assert engine == "hf" or run["identical_to_batch1"] == 3     # of the three batch-1 served
            for name, value in entry["median"].items():
                assert value == statistics.median(run[name] for run in entry["runs"])
    assert results["batch-1"]["1"]["median"]["forwards"] == asked[1]          # a prefill and n - 1 decodes each
    for c in ("1", "3"):
        assert results["scheduler"][c]["median"]["preemptions"] == 0      # the default pool fits C requests
        assert results["scheduler"][c]["median"]["prefix_hit_rate"] > 0   # the shared opening, two blocks of 4
    assert results["hf"]["1"]["median"]["forwards"] == asked[1]           # batches of one: nothing padded
    assert results["hf"]["3"]["median"]["forwards"] < asked[3]


def test_the_scheduler_makes_batch_ones_tokens_under_poisson_arrivals(llm):
    trace = make_trace(llm.tokenizer, dataclasses.replace(TINY, rate=20.0), llm.config)
    settings = ServingSettings(concurrency=(2,), engines=("batch-1", "scheduler"), runs=1)
    alone, reference = serve("batch-1", 1, llm, trace, settings)
    figures, tokens = serve("scheduler", 2, new_scheduler(llm, trace, 2, settings), trace, settings, reference)
    assert tokens == reference and figures["identical_to_batch1"] == len(trace)
    assert alone["seconds"] >= trace[-1].arrival and figures["seconds"] >= trace[-1].arrival   # nobody started early


def test_ratios_are_of_medians_and_say_whether_the_devices_targets_are_met():
    def entry(tok_s):
        return {"median": {"output_tok_s": tok_s}}
    results = {"batch-1": {"1": entry(10.0)}, "scheduler": {"1": entry(9.0), "16": entry(45.0), "64": entry(190.0)},
               "hf": {"1": entry(10.0), "16": entry(36.0)}}
    ratio, targets = ratios(results, "cpu")
    assert ratio == {"scheduler_over_batch1": {"1": 0.9, "16": 4.5, "64": 19.0},
                     "scheduler_over_hf": {"1": 0.9, "16": 1.25}}
    assert [(t["ratio"], t["target"], t["met"]) for t in targets] == [(4.5, 4.0, True), (1.25, 1.5, False)]
    _, targets = ratios(results, "cuda")
    assert [(t["ratio"], t["target"], t["met"]) for t in targets] == [(19.0, 20.0, False)]


def test_the_command_writes_the_report_with_both_switch_sets(tmp_path, capsys):
    """A preset (random weights, the bundled tokenizer's ids), no hf; batch-1 under other switches than
    the scheduler, so a second copy of the model is loaded for it."""
    path = tmp_path / "serving.json"
    assert main(TINY_ARGS + ["--model", "preset:smollm2-135m", "--engines", "batch-1,scheduler", "--dtype", "bf16",
                             "--engine", "fused=false", "--batch1-engine", "attention=naive", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    for key in ("device", "threads", "versions", "method", "settings", "trace", "results", "ratios", "load_average"):
        assert key in report
    assert "no HTTP" in report["method"] and "random weights" in report["method"] and report["threads"] == 2
    assert report["model"] == "preset:smollm2-135m" and report["dtype"] == "bf16"
    assert report["engine_switches"] == {"scheduler": {"dtype": "bf16", "fused": False},
                                         "batch-1": {"dtype": "bf16", "attention": "naive"}}
    assert set(report["load_seconds"]) == {"scheduler", "batch-1"}
    assert set(report["load_average"]) == {"before", "after", "n_cpus"}
    assert report["settings"]["trace"]["n_requests"] == 3 and len(report["trace"]["output_tokens"]) == 3
    assert set(report["results"]) == {"batch-1", "scheduler"}
    assert set(report["ratios"]["scheduler_over_batch1"]) == {"1", "2"}
    assert report["results"]["batch-1"]["1"]["median"]["output_tokens"] == sum(report["trace"]["output_tokens"][:2])
    assert "scheduler   2" in capsys.readouterr().out


BAD = [
    pytest.param(["--concurrency", "0"], lambda: ServingSettings(concurrency=(0,)), "from 1 to 64, got 0",
                 marks=pytest.mark.bad_input(kind="serving bench: concurrency 0 (or above 64)",
                                             gets="LlmlabError / exit 2: requests in flight from 1 to 64"),
                 id="concurrency-0"),
    pytest.param(["--rate", "-2"], lambda: TraceSettings(rate=-2.0), "positive number of requests per second",
                 marks=pytest.mark.bad_input(kind="serving bench: a negative or zero arrival rate",
                                             gets="LlmlabError / exit 2: a positive rate, or none for a closed loop"),
                 id="negative-rate"),
    pytest.param(["--engines", "scheduler,vllm"], lambda: ServingSettings(engines=("vllm",)), "unknown engine 'vllm'",
                 marks=pytest.mark.bad_input(kind="serving bench: an unknown engine",
                                             gets="LlmlabError / exit 2 listing batch-1, scheduler, hf"),
                 id="unknown-engine"),
    pytest.param(["--requests", "5000"], lambda: TraceSettings(n_requests=5000), "must be 1 to 1024",
                 marks=pytest.mark.bad_input(kind="serving bench: more requests than the bound (1,024)",
                                             gets="LlmlabError / exit 2 before anything is loaded"),
                 id="too-many-requests"),
    pytest.param(["--prompt-tokens", "256", "32"], lambda: TraceSettings(prompt_tokens=(256, 32)), "least <= most",
                 marks=pytest.mark.bad_input(kind="serving bench: a length range whose least is above its most",
                                             gets="LlmlabError / exit 2 naming the range"),
                 id="reversed-range"),
    pytest.param(["--concurrency", "1,two"], None, "whole numbers separated by commas",
                 marks=pytest.mark.bad_input(kind="serving bench: --concurrency that is not a list of numbers",
                                             gets="exit 2: give whole numbers separated by commas"),
                 id="concurrency-text"),
    pytest.param(["--batch1-requests", "0"], lambda: ServingSettings(batch1_requests=0), "--batch1-requests must be",
                 marks=pytest.mark.bad_input(kind="serving bench: no requests for the C = 1 runs",
                                             gets="LlmlabError / exit 2: a whole number >= 1"),
                 id="batch1-requests-0"),
    pytest.param(["--batch1-engine", "cuda_graphs=maybe"], None,
                 "--batch1-engine 'cuda_graphs=maybe': cuda_graphs takes true or false",
                 marks=pytest.mark.bad_input(kind="serving bench: a malformed --engine or --batch1-engine switch set",
                                             gets="exit 2 naming the flag and the switch"),
                 id="bad-switch"),
    pytest.param(["--engine", "speculative=prompt-lookup:4"],
                 lambda: serving.run(engine=EngineOptions(speculative="prompt-lookup:4")), "cannot run this switch",
                 marks=pytest.mark.bad_input(kind="serving bench: a switch the scheduler cannot run (speculative, tp, "
                                                  "another KV cache layout)",
                                             gets="LlmlabError / exit 2 before anything is loaded, saying why"),
                 id="scheduler-switch"),
    pytest.param(["--model", "preset:llama-3.2-1b"], lambda: serving.run("preset:llama-3.2-1b"), "leave hf out",
                 marks=pytest.mark.bad_input(kind="serving bench: the hf engine on a preset (random weights, nothing "
                                                  "for transformers to load)",
                                             gets="LlmlabError / exit 2 before anything is loaded: --engines "
                                                  "batch-1,scheduler"),
                 id="hf-on-a-preset"),
]


@pytest.mark.parametrize("argv, api_call, message", BAD)
def test_bad_arguments_are_refused_before_anything_runs(argv, api_call, message, capsys):
    if api_call is not None:
        with pytest.raises(LlmlabError, match=message):
            api_call()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_the_module_exits_with_2_on_a_bad_argument():
    done = subprocess.run([sys.executable, "-m", "llmlab.bench.serving", "--concurrency", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --concurrency")
