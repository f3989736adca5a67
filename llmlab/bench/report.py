"""The report: the machine, the versions, how each number was measured (in words), the table and the JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import LlmlabError
from ..options import EngineOptions
from .gptfast import SAMPLING
from .measure import BenchSettings

TIMER = "time.perf_counter"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):   # no /proc on macOS or Windows: fall back to platform's name
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):   # Windows
        return None


def versions(with_transformers: bool) -> dict:
    from .. import __version__
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "llmlab": __version__, "platform": platform.platform()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):   # not a git checkout, or no git: omit it
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            v["llmlab_git"] = commit.stdout.strip()
    if with_transformers:
        import transformers
        v["transformers"] = transformers.__version__
    return v


def method_text(settings: BenchSettings, engines: list[EngineOptions], peers: list[str], device: torch.device,
                prompt: str) -> str:
    s = settings
    timer = TIMER + (" after torch.cuda.synchronize()" if device.type == "cuda" else "")
    text = (
        f"Prompt: {prompt}. "
        f"Prefill: one eager forward pass over the {s.prompt_tokens}-token prompt with a fresh KV cache, up "
        f"to the last position's logits; tok/s = {s.prompt_tokens} / seconds. "
        f"Decode: {s.new_tokens} greedy tokens after an untimed prefill of the same prompt (positions "
        f"{s.prompt_tokens}..{s.prompt_tokens + s.new_tokens - 1}); no stop token ends a run. Eager llmlab "
        f"engines: one forward of one token at an int position with the KV cache, plus the argmax, per step. "
        f"Graph-ready ones (compile, cuda_graphs): llmlab.step's Decoder as generation uses it, made once per "
        f"cache bucket; start() (prefill and first token) untimed, then next_tokens() calls of steps_per_graph "
        f"steps each (greedy sampling on the device), with no host sync inside the timed region and one at its "
        f"end; new_tokens is rounded up to whole calls and tok/s counts the tokens made (decode_tokens). A "
        f"decoder's first call (compile, capture) is made before any clock starts. "
        f"{s.warmup} untimed warm-up round(s), then {s.runs} timed runs; every engine takes its turn in each "
        f"round, prefill then decode; reported: the median tok/s; ratios are of medians, measured in the same "
        f"rounds. Timer: {timer}. "
        + (f"Batch 1. " if s.batch == 1 else f"Batch {s.batch}: the same prompt in every row, prefill and decode; "
           f"tok/s counts the tokens of every row. ")
        + f"The first engine is the baseline (ratio_over_baseline). "
        f"Decode after other context lengths (decode_by_context), when asked: the same rounds and turns. "
        f"weight_bytes_per_token: bytes of every weight as stored (a quantized layer's codes and scales), each "
        f"storage once, with one row of the embedding table; decode_bandwidth_fraction (with --roofline): "
        f"weight_bytes_per_token x decode tok/s / the measured copy bandwidth (bytes read + written per "
        f"second of a large device-to-device copy)."
    )
    if any(o.compile != "none" for o in engines):
        text += (
            " compile_seconds: the first call of a fresh Decoder (torch.compile's trace, code generation and "
            "build, and the first steps), cold with inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR and "
            "TRITON_CACHE_DIR) in a new empty folder and its in-memory caches cleared; warm after "
            "torch._dynamo.reset() with that folder filled (fxgraph_cache_hit: inductor's cache hits then). "
            "Each engine compiles in its own folder, for the whole run."
        )
    if "hf" in peers:
        text += (
            " Peer hf: Hugging Face transformers in the same process, in the baseline's dtype, same threads and "
            "prompt ids, eager with its default attention (SDPA) and DynamicCache; prefill = model(prompt, "
            "use_cache=True, logits_to_keep=1); decode = a manual loop feeding past_key_values back, one token at "
            "a time (not model.generate, whose per-step overhead would be counted against HF). llmlab's KV cache "
            "is preallocated at its final size before the clock starts; HF's DynamicCache grows inside the timed "
            "calls, as it does in use. ratio_llmlab_over_hf = baseline median / hf median tok/s."
        )
    if "llamacpp" in peers:
        text += (
            " Peer llamacpp: llama.cpp through llama-cpp-python, in the same process, on the same GGUF file (its "
            "own kernels for the file's quantized formats), same thread count and prompt ids; prefill = "
            "eval(prompt) after reset(); decode = eval([token]) then the argmax of its logits, one token at a time."
        )
    if "gpt-fast" in peers:
        text += (
            " Peer gpt-fast: pytorch-labs/gpt-fast's own model.py and generate.py (see llmlab.bench.gptfast), "
            "its Transformer built with the same shape (an untied LM head: the same bytes per token), random "
            "bf16 weights N(0, 0.02), KV cache set up once for the longest run; prefill = its prefill() "
            "(eager); decode = its decode_n_tokens() with decode_one_token compiled by torch.compile(mode="
            "'reduce-overhead', fullgraph=True) as its main() does (CUDA graphs; the position tensor bumped in "
            f"place), sampling on the device with {SAMPLING} (llmlab.bench.gptfast.SAMPLING). Its compile, warm-up "
            "and graph recording happen in an untimed first call. The inductor flags its generate.py sets "
            "(coordinate_descent_tuning, triton.unique_kernel_names, fx_graph_cache, enable_autograd_cache) "
            "are process-wide; here they are set only while gpt-fast's calls run, so llmlab's compiles in the "
            "same process do not get coordinate-descent tuning."
        )
    return text


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"model   {report['model']}",
        f"device  {report['device']}, {report['threads']} threads, batch {report['batch']}"
        + (f", tensor parallel over {report['tensor_parallel']['world']} processes" if "tensor_parallel" in report else ""),
        f"runs    median of {s['runs']} after {s['warmup']} warm-up",
        "loaded  " + ", ".join(f"{name} in {sec:.1f} s" for name, sec in report["load_seconds"].items()),
    ]
    load = report.get("load_average", {})
    if load.get("before") is not None:
        lines.append(f"load    {load['before']:.1f} before the runs, {load['after']:.1f} after, on {load['n_cpus']} CPUs "
                     f"(1-minute load average: well above 0 before means other work was running)")
    width = max(14, *(len(name + " / baseline") + 1 for name in report.get("ratio_over_baseline", {})),
                *(len(name) + 1 for name in report["results"]))
    lines += ["", f"{'engine':<{width}} {'prefill ' + str(s['prompt_tokens']) + ' tok':>18} "
                  f"{'decode ' + str(s['new_tokens']) + ' tok':>18}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<{width}} {r['prefill_tok_s_median']:>12.1f} tok/s {r['decode_tok_s_median']:>12.1f} tok/s")
    baseline = next(iter(report["results"]))
    for name, ratio in report.get("ratio_over_baseline", {}).items():
        lines.append(f"{name + ' / baseline':<{width}} {ratio['prefill']:>16.2f}x {ratio['decode']:>16.2f}x")
    if "ratio_llmlab_over_hf" in report:
        ratio = report["ratio_llmlab_over_hf"]
        lines.append(f"{'baseline / hf':<{width}} {ratio['prefill']:>16.2f}x {ratio['decode']:>16.2f}x")
    lines.append(f"(baseline: {baseline})")
    for name, c in report.get("compile_seconds", {}).items():
        lines.append(f"compile {name}: {c['cold']:.1f} s cold, {c['warm']:.1f} s warm "
                     f"({c['fxgraph_cache_hit']} FX-graph cache hit(s))")
    for name, n in report.get("launches", {}).items():
        lines.append(f"launches {name}: {n['kernels_per_step']:.1f} kernels, {n['host_launches_per_step']:.1f} "
                     f"host launches per decode step")
    for name, fraction in report.get("decode_bandwidth_fraction", {}).items():
        lines.append(f"bandwidth {name}: decode reads weights at {100 * fraction:.1f} % of the copy bandwidth")
    for context, entry in report.get("decode_by_context", {}).items():
        speeds = ", ".join(f"{name} {r['decode_tok_s_median']:.1f} tok/s" for name, r in entry.items()
                           if isinstance(r, dict))
        ratio = f" (baseline/hf {entry['ratio_llmlab_over_hf']:.2f}x)" if "ratio_llmlab_over_hf" in entry else ""
        lines.append(f"decode after {context:>5} tokens: {speeds}{ratio}")
    if "roofline" in report:
        from ..roofline import format_roofline

        overhead = report["roofline"]["profiler_overhead"]
        lines += ["", format_roofline(report["roofline"]),
                  f"profiler on: decode {100 * overhead['overhead']:+.1f} % time per token against the plain loop"]
    if "tokenizer" in report:
        t = report["tokenizer"]
        lines += ["", f"tokenizer: encode {t['n_bytes']:,} bytes of Shakespeare (median of {len(t['hf']['seconds'])})"]
        for name, label in (("llmlab_cold", "llmlab, cold cache"), ("llmlab", "llmlab, warm cache"), ("hf", "hf")):
            r = t[name]
            lines.append(f"{label:<19} {r['seconds_median']:>7.3f} s {r['mb_per_s']:>7.2f} MB/s {r['n_tokens']:>9,} tokens")
        lines.append(f"llmlab/hf speed: {t['ratio_llmlab_cold_over_hf']:.2f}x cold, {t['ratio_llmlab_over_hf']:.2f}x warm")
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> None:
    try:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise LlmlabError(f"cannot write the JSON report to {path}: {e.strerror}") from None


def stderr_progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
