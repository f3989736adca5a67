"""The benchmark harness: prefill and decode speed of llmlab under several sets of switches, and of its
peers, measured the same way in the same rounds.

    engines.py          LlmlabEngine (one per EngineOptions), HFEngine, LlamaCppEngine; weight bytes per token
    gptfast.py          gpt-fast's own code as a peer, on a GPU (exported into the git-ignored
                        peers/gpt-fast, never committed: its docstring has the command)
    measure.py          BenchSettings; rounds in turns, medians; decode by context; profiled runs
    compile_time.py     what compiling the decode step costs, cold and warm
    tokenizer_speed.py  llmlab's tokenizer against Hugging Face's
    report.py           the machine, versions, the method in words, the table, the JSON

    from llmlab import bench
    from llmlab.options import EngineOptions
    report = bench.run("preset:smollm2-135m", engines=[EngineOptions(dtype="bf16"),
                                                       EngineOptions(dtype="bf16", compile="default")])
    print(bench.format_table(report))

Each llmlab engine is `llmlab.load(model, device=..., **options)` and is named `options.name()` (every
switch set away from its default, e.g. `llmlab[dtype=bf16,compile=default]`); the first is the baseline
the others are compared with. What is timed is written into every JSON report as `method`
(report.method_text): prefill is one eager forward over the prompt; decode is the engine's real decode
path, the eager loop or the fixed-shape Decoder (compiled, CUDA-graphed) for graph-ready options. On a
shared or throttling machine, the ratios measured in one run are the numbers to trust, not the speeds.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import tempfile
import time
from pathlib import Path

import torch

from .. import parallel
from ..errors import LlmlabError
from ..launches import launches_per_step
from ..llm import bundled_model_path, load, parse_device
from ..options import EngineOptions
from ..roofline import measure_peaks, roofline_report
from .collectives import tensor_parallel_report
from .compile_time import compile_seconds, inductor_cache
from .engines import (HFEngine, LlamaCppEngine, LlmlabEngine, bench_prompt, load_hf_model, load_hf_tokenizer,
                      require_transformers, weight_bytes_per_token)
from .gptfast import DEFAULT_DIR as GPT_FAST_DIR, GptFastEngine, check_gpt_fast
from .measure import BenchSettings, measure, measure_contexts, profiled_runs, take_turns
from .report import device_name, format_table, load_average, method_text, stderr_progress, versions, write_json
from .tokenizer_speed import tokenizer_benchmark

__all__ = ["BenchSettings", "GptFastEngine", "HFEngine", "LlamaCppEngine", "LlmlabEngine", "PEERS", "format_table",
           "load_hf_model", "load_hf_tokenizer", "measure", "measure_contexts", "run", "stderr_progress", "take_turns",
           "tokenizer_benchmark", "weight_bytes_per_token", "write_json"]

PEERS = ("hf", "llamacpp", "gpt-fast")


def check_engines(engines: list[EngineOptions]) -> list[str]:
    """Their names, once each is known to be an EngineOptions and no two share a name."""
    if not engines or not all(isinstance(o, EngineOptions) for o in engines):
        raise LlmlabError("engines must be a non-empty list of llmlab.options.EngineOptions")
    names = [o.name() for o in engines]
    if len({o.tp for o in engines}) > 1:
        raise LlmlabError("every engine of one bench runs on the same processes: give them all the same tp "
                          "(run the bench once per tp, e.g. with --tp 2 for all)")
    for name in names:
        if names.count(name) > 1:
            raise LlmlabError(f"two engines are both {name}: each engine must differ from the others in at "
                              f"least one switch")
    return names


def run(model: str | os.PathLike | None = None, *, engines: list[EngineOptions] = (EngineOptions(),),
        device: str = "cpu", threads: int | None = None, compare: str | None = None,
        gpt_fast_dir: str | os.PathLike = GPT_FAST_DIR, settings: BenchSettings = BenchSettings(),
        contexts: tuple[int, ...] = (), roofline: bool = False, tokenizer: bool = False, launches: bool = False,
        progress=None) -> dict:
    """Load every engine, measure them in the same rounds, and return the report as a plain dict (what
    --json writes). engines: one EngineOptions per llmlab engine, the first the baseline; compare: a
    peer ("hf", "llamacpp", or "gpt-fast" on a GPU from gpt_fast_dir); contexts: decode also after
    prompts of these lengths; roofline: this machine's peaks and the baseline's stages under them;
    tokenizer: llmlab's tokenizer against HF's; launches: kernels and host launches per decode step."""
    engines = list(engines)
    check_engines(engines)
    dev = parse_device(device)
    if compare not in (None, *PEERS):
        raise LlmlabError(f"unknown peer {compare!r}; choose one of: {', '.join(PEERS)}")
    if compare == "gpt-fast":
        check_gpt_fast(gpt_fast_dir, dev)
    if threads is None and dev.type == "cpu":
        threads = max(1, 2 // engines[0].tp)     # two cores in all: under tp, shared by its processes
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise LlmlabError(f"threads (--threads) must be an integer >= 1, got {threads!r}")
    if compare == "hf" or tokenizer:
        require_transformers()
    source = str(model) if model is not None else str(bundled_model_path())
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)     # one process-wide setting: every engine gets the same
    try:
        with tempfile.TemporaryDirectory(prefix="llmlab-bench-") as workdir:
            return _run(source, engines, dev, compare, gpt_fast_dir, settings, contexts, roofline, tokenizer,
                        launches, progress or (lambda message: None), Path(workdir))
    finally:
        torch.set_num_threads(previous_threads)


def _warn_if_busy(dev: torch.device, progress) -> float | None:
    load = load_average()
    if dev.type == "cpu" and load is not None and load > (os.cpu_count() or 1) - torch.get_num_threads() + 0.5:
        progress(f"warning: the machine is busy (load average {load:.1f} on {os.cpu_count()} CPUs): timings "
                 f"will be noisy, so compare the ratios, or retry when it is idle"
                 + (f". When other work holds a core, {torch.get_num_threads()} threads can be many times slower "
                    f"than fewer (each op waits for its slowest thread)" if torch.get_num_threads() > 1 else ""))
    return load


def _run(source: str, engines: list[EngineOptions], dev: torch.device, compare: str | None, gpt_fast_dir,
         settings: BenchSettings, contexts: tuple[int, ...], roofline: bool, tokenizer: bool, launches: bool,
         progress, workdir: Path) -> dict:
    load_before = _warn_if_busy(dev, progress)
    timed, load_seconds = [], {}
    for options in engines:
        progress(f"loading {source} on {dev} as {options.name()}")
        start = time.perf_counter()
        timed.append(LlmlabEngine(load(source, device=str(dev), **dataclasses.asdict(options)), settings.batch))
        load_seconds[options.name()] = time.perf_counter() - start
    baseline = timed[0].llm
    steps = max(o.steps_per_graph for o in engines)
    for prompt_tokens in (settings.prompt_tokens, *contexts):
        BenchSettings(prompt_tokens, settings.new_tokens).check(baseline.config, steps)
    ids, prompt = bench_prompt(baseline, settings.prompt_tokens)
    longest = max((settings.prompt_tokens, *contexts)) + settings.new_tokens
    peers = _load_peer(compare, source, baseline, dev, longest, gpt_fast_dir, load_seconds, progress, settings.batch)

    compiled = {}
    for i, engine in enumerate(timed):
        if engine.options.compile != "none":
            progress(f"compiling {engine.name}'s decode step: cold, then warm")
            engine.inductor_cache = workdir / f"inductor-{i}"   # its compiles for the whole run go here
            compiled[engine.name] = compile_seconds(engine.llm, ids, engine.inductor_cache)

    everyone = timed + peers
    report = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dev),
        "device_type": dev.type,
        "threads": torch.get_num_threads(),
        "versions": versions(with_transformers=bool(compare == "hf" or tokenizer)),
        "model": source,
        "engines": {e.name: e.options.as_dict() for e in timed},
        "dtype": baseline.options.model_dtype,       # the baseline's, and the HF peer's
        "batch": settings.batch,
        "settings": settings.__dict__,
        "method": method_text(settings, engines, [p.name for p in peers], dev, prompt),
        "load_seconds": load_seconds,   # file to a ready model, before any run
        "weight_bytes_per_token": {e.name: e.weight_bytes_per_token() for e in everyone
                                   if hasattr(e, "weight_bytes_per_token")},
        "results": measure(everyone, ids, settings, progress),
    }
    if compiled:
        report["compile_seconds"] = compiled
    # the 1-minute load average, to tell a quiet machine's numbers from a shared one's
    report["load_average"] = {"before": load_before, "after": load_average(), "n_cpus": os.cpu_count()}
    results, first = report["results"], timed[0].name
    if len(results) > 1:
        report["ratio_over_baseline"] = {
            name: {stage: r[f"{stage}_tok_s_median"] / results[first][f"{stage}_tok_s_median"]
                   for stage in ("prefill", "decode")}
            for name, r in results.items() if name != first}
    if compare == "hf":
        report["ratio_llmlab_over_hf"] = {stage: results[first][f"{stage}_tok_s_median"] / results["hf"][f"{stage}_tok_s_median"]
                                          for stage in ("prefill", "decode")}
    if compare == "llamacpp":
        report["versions"]["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
    if compare == "gpt-fast":
        report["gpt_fast"] = {"dir": str(Path(gpt_fast_dir).resolve()), "commit": peers[0].commit(),
                              "first_call_seconds": peers[0].first_call_seconds}
    if parallel.tensor_parallel_of(baseline.model) is not None:
        progress("profiling the collectives of each engine's decode step")
        report["tensor_parallel"] = tensor_parallel_report(timed, peers, ids, 32, dev)
    if contexts:
        report["decode_by_context"] = measure_contexts(everyone, baseline, contexts, settings, progress)
    if roofline:
        _add_roofline(report, timed, source, dev, ids, settings, progress)
    if launches:
        progress("counting kernels and host launches per decode step")
        report["launches"] = {}
        for engine in timed:
            with inductor_cache(engine.inductor_cache):
                report["launches"][engine.name] = launches_per_step(engine.llm)
    if tokenizer:
        progress("timing the tokenizers on 1 MB of Shakespeare")
        report["tokenizer"] = tokenizer_benchmark(baseline.tokenizer, load_hf_tokenizer(source))
    return report


def _load_peer(compare, source, baseline, dev, longest, gpt_fast_dir, load_seconds, progress, batch: int) -> list:
    if compare is None:
        return []
    if batch > 1 and compare != "gpt-fast":
        raise LlmlabError(f"--batch {batch}: of the peers, only gpt-fast is run at a batch above 1")
    progress(f"loading {source} on {dev} ({compare})")
    start = time.perf_counter()
    if compare == "llamacpp":
        peer = LlamaCppEngine(source, longest, torch.get_num_threads())
    elif compare == "hf":
        peer = HFEngine(load_hf_model(source, baseline.config, baseline.dtype, dev), dev)
    else:
        shard = parallel.tensor_parallel_of(baseline.model)
        peer = GptFastEngine(gpt_fast_dir, baseline.config if shard is None else baseline.model.config_before_sharding,
                             baseline.device, longest, batch=batch, world=1 if shard is None else shard.world)
    load_seconds[peer.name] = time.perf_counter() - start
    return [peer]


def _add_roofline(report: dict, timed: list, source: str, dev: torch.device, ids: list[int],
                  settings: BenchSettings, progress) -> None:
    """The peaks, the stages of the first eager engine under them (a compiled step has no stages to
    time: with none, the baseline's switches are loaded again without compile and CUDA graphs), and
    each engine's decode bandwidth as a fraction of the copy bandwidth."""
    progress("measuring this machine's peak FLOP/s and bandwidth, then profiling one generation")
    eager = next((e.llm for e in timed if not e.options.graph_ready), None)
    if eager is None:
        options = dataclasses.replace(timed[0].options, compile="none", cuda_graphs=False, steps_per_graph=1)
        eager = load(source, device=str(dev), **dataclasses.asdict(options))
    peaks = measure_peaks(dev, eager.dtype)
    profile, overhead = profiled_runs(eager, ids, settings)
    report["roofline"] = roofline_report(profile, peaks)
    report["roofline"]["engine"] = eager.options.name()
    report["roofline"]["profiler_overhead"] = overhead
    report["decode_bandwidth_fraction"] = {
        name: n_bytes * report["results"][name]["decode_tok_s_median"] / peaks.copy_bandwidth
        for name, n_bytes in report["weight_bytes_per_token"].items()}
