"""Rounds and medians: every engine takes its turn in each round, so a slow spell of the machine hits all."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import LlmlabError
from ..llm import LLM
from ..profile import profile_generation
from .engines import LlmlabEngine, bench_prompt


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 512
    new_tokens: int = 128
    runs: int = 5
    warmup: int = 1
    batch: int = 1          # copies of the prompt decoded side by side; tokens/s counts every row

    def __post_init__(self):
        for name, low in (("prompt_tokens", 1), ("new_tokens", 1), ("runs", 1), ("warmup", 0), ("batch", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                flag = "--" + name.replace("_", "-")
                raise LlmlabError(f"{name} ({flag}) must be an integer >= {low}, got {value!r}")

    def check(self, config: ModelConfig, steps_per_graph: int = 1) -> None:
        """The longest generation must fit the model's context (with graph steps rounded up)."""
        n = self.prompt_tokens + -(-self.new_tokens // steps_per_graph) * steps_per_graph
        if n > config.max_seq_len:
            raise LlmlabError(f"prompt_tokens + new_tokens = {n} is more than the model's context of "
                              f"{config.max_seq_len} tokens")


def take_turns(engines: list, settings: BenchSettings, run_one, progress=None, label: str = "") -> dict[str, list]:
    """Every engine `warmup + runs` rounds, taking turns; each engine's results of run_one(engine)
    from the timed rounds."""
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
    """Prefill then decode for every engine, taking turns; return each engine's timed runs. Decode
    tok/s counts the tokens each engine really made (a multi-step graph rounds new_tokens up)."""
    runs = take_turns(engines, settings,
                      lambda e: (e.prefill_seconds(ids), e.decode_seconds(ids, settings.new_tokens)), progress)
    results = {}
    for engine in engines:
        timed, made = runs[engine.name], engine.tokens_made(settings.new_tokens) * settings.batch
        r = results[engine.name] = {"prefill_s": [p for p, _ in timed], "decode_s": [d for _, d in timed],
                                    "decode_tokens": made}
        r["prefill_tok_s"] = [settings.prompt_tokens * settings.batch / s for s in r["prefill_s"]]
        r["decode_tok_s"] = [made / s for s in r["decode_s"]]
        r["prefill_tok_s_median"] = statistics.median(r["prefill_tok_s"])
        r["decode_tok_s_median"] = statistics.median(r["decode_tok_s"])
    return results


def measure_contexts(engines: list, llm: LLM, contexts: tuple[int, ...], settings: BenchSettings,
                     progress=None) -> dict:
    """Decode speed after prompts of each length in `contexts`: the same rounds, turns and medians as
    `measure`, decode only. Each step attends over the whole context, so its cost grows with it."""
    by_context, baseline = {}, engines[0].name
    n = settings.new_tokens
    for context in contexts:
        ids = bench_prompt(llm, context)[0]
        runs = take_turns(engines, settings, lambda e: e.tokens_made(n) / e.decode_seconds(ids, n),
                          progress, f"context {context}: ")
        entry = {name: {"decode_tok_s": tok_s, "decode_tok_s_median": statistics.median(tok_s)}
                 for name, tok_s in runs.items()}
        if "hf" in entry:
            entry["ratio_llmlab_over_hf"] = entry[baseline]["decode_tok_s_median"] / entry["hf"]["decode_tok_s_median"]
        by_context[str(context)] = entry
    return by_context


def profiled_runs(llm: LLM, ids: list[int], settings: BenchSettings) -> tuple:
    """Profile the generation `warmup + runs` times, taking turns with the plain (eager) decode loop.
    Returns the timed profile with the median decode step (the first ones pay one-off costs: CUDA
    events, allocator growth) and the profiler's overhead: profiled against plain seconds per token.
    `llm` must be loaded eagerly: a compiled step has no stages to time."""
    engine, plain, profiles = LlmlabEngine(llm), [], []
    for r in range(settings.warmup + settings.runs):
        p = engine.eager_decode_seconds(ids, settings.new_tokens) / settings.new_tokens
        profile = profile_generation(llm, ids, settings.new_tokens + 1, stop_ids=set())
        if r >= settings.warmup:
            plain.append(p)
            profiles.append(profile)
    profiles.sort(key=lambda profile: profile.decode_wall)
    median = profiles[len(profiles) // 2]
    plain_s = statistics.median(plain)
    return median, {"plain_seconds_per_token": plain_s, "profiled_seconds_per_token": median.decode_wall,
                    "overhead": median.decode_wall / plain_s - 1}
