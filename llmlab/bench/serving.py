"""Serving under load: continuous batching against one request at a time and against static batches, on
one trace of real requests: throughput, time to first token (TTFT), time per output token (TPOT), KV memory.

    llmlab bench-serve [--model M] [--concurrency 1,4,16] [--requests 32] [--rate R] [--runs 3] [--json PATH]
    llmlab bench-serve --device cuda --model preset:llama-3.2-1b --dtype bf16 --engines batch-1,scheduler \\
        --engine cuda_graphs=true --batch1-engine kernels=fused-decode,cuda_graphs=true,steps_per_graph=8
    (or python -m llmlab.bench.serving ...)

The trace: --requests requests drawn with --seed. Each prompt is a passage of the held-out plays
(llmlab.corpus) of a length drawn from --prompt-tokens; on a --shared-fraction of them its first
--shared-prefix tokens are one shared opening instead, standing in for a system prompt (what the prefix
cache can hit). Each asks for a number of tokens drawn from --output-tokens, greedy with no stop token,
so every engine makes exactly the tokens asked for.

The load generator runs in this process and calls each engine's Python API: no HTTP, whose cost would
be the same for every engine. Closed loop by default: C clients, each sending its next request the
moment its last one is answered, so C requests are in flight. With --rate, open loop: requests arrive
as a Poisson process of that many per second whether the engine keeps up or not, and C bounds what
runs at once (the scheduler's max_running, hf's batch).

    batch-1     llm.generate_ids, one request at a time, under the --batch1-engine switches (e.g. the
                fastest single-stream engine: compiled or CUDA-graphed); C = 1 only
    scheduler   llmlab.serve.scheduler.Scheduler with max_running = C, under the --engine switches:
                requests join and leave every step
    hf          Hugging Face transformers' generate on static batches of C requests, left-padded

At C = 1 requests run one at a time, and the whole trace would take longest there: every engine's C = 1
run serves only the first --batch1-requests requests of the trace. Its throughput is a rate over a sample.

Bounded: at most MAX_REQUESTS requests of at most MAX_PROMPT + MAX_OUTPUT tokens, at most
MAX_CONCURRENCY in flight, and every run stopped with an error past --time-limit seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import math
import os
import random
import re
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..cli import parse_engine_spec, with_base
from ..config import ModelConfig
from ..corpus import HELD_OUT_PLAYS, held_out_text
from ..errors import LlmlabError
from ..llm import LLM, load, parse_device
from ..options import EngineOptions, engine_options
from ..serve.engine import check_serve_options
from ..serve.scheduler import Request, Scheduler
from ..validate import is_int
from . import _warn_if_busy
from .engines import load_hf_model, sync
from .report import device_name, load_average, stderr_progress, versions, write_json

ENGINES = ("batch-1", "scheduler", "hf")
LENGTHS = ("uniform", "speeches")
# A speaker's name alone on its line, as the plays' text sets it: a speech begins after it.
SPEECH = re.compile(r"\n\n[A-Z][A-Z' ,-]*\.\n")
MAX_REQUESTS, MAX_CONCURRENCY, MAX_PROMPT, MAX_OUTPUT = 1024, 64, 1024, 512
# what the issue asks of continuous batching, by device type: (engine, C) over (engine, C) at least this many times
TARGETS = {"cpu": ((("scheduler", 16), ("batch-1", 1), 4.0), (("scheduler", 16), ("hf", 16), 1.5)),
           "cuda": ((("scheduler", 64), ("batch-1", 1), 20.0),)}


def _check_range(value, flag: str, largest: int) -> None:
    if not (isinstance(value, tuple) and len(value) == 2 and all(is_int(v) for v in value)
            and 1 <= value[0] <= value[1] <= largest):
        raise LlmlabError(f"{flag} must be two whole numbers, least and most, with 1 <= least <= most <= {largest}; "
                          f"got {value!r}")


@dataclass(frozen=True)
class TraceSettings:
    n_requests: int = 32
    prompt_tokens: tuple[int, int] = (32, 128)      # least, most; drawn uniformly
    output_tokens: tuple[int, int] = (32, 64)
    shared_prefix: int = 32                         # tokens of the shared opening; 0: none
    shared_fraction: float = 0.5
    rate: float | None = None                       # requests per second (open loop); None: closed loop
    seed: int = 0
    lengths: str = "uniform"                        # of the outputs: "uniform", or "speeches" (real ones)

    def __post_init__(self):
        if self.lengths not in LENGTHS:
            raise LlmlabError(f"--lengths must be one of {', '.join(LENGTHS)}, got {self.lengths!r}")
        if not is_int(self.n_requests) or not 1 <= self.n_requests <= MAX_REQUESTS:
            raise LlmlabError(f"--requests must be 1 to {MAX_REQUESTS} (every engine runs the whole trace, which "
                              f"is held in memory), got {self.n_requests!r}")
        _check_range(self.prompt_tokens, "--prompt-tokens", MAX_PROMPT)
        _check_range(self.output_tokens, "--output-tokens", MAX_OUTPUT)
        if not is_int(self.shared_prefix) or not 0 <= self.shared_prefix <= self.prompt_tokens[0]:
            raise LlmlabError(f"--shared-prefix must be 0 to the shortest prompt ({self.prompt_tokens[0]} tokens), "
                              f"got {self.shared_prefix!r}")
        if not (isinstance(self.shared_fraction, (int, float)) and 0 <= self.shared_fraction <= 1):
            raise LlmlabError(f"--shared-fraction must be between 0 and 1, got {self.shared_fraction!r}")
        if self.rate is not None and not (isinstance(self.rate, (int, float)) and 0 < self.rate < math.inf):
            raise LlmlabError(f"--rate must be a positive number of requests per second (or left out for a "
                              f"closed loop), got {self.rate!r}")


@dataclass(frozen=True)
class ServingSettings:
    concurrency: tuple[int, ...] = (1, 4, 16)
    engines: tuple[str, ...] = ENGINES
    runs: int = 3
    batch1_requests: int = 8         # the C = 1 runs serve the trace's first this many (all, if it is shorter)
    block_size: int = 16
    token_budget: int = 256          # the scheduler's tokens per step (chunked prefill)
    kv_blocks: int | None = None     # the scheduler's pool; None: room for C requests of the longest kind
    time_limit: float = 1800.0       # seconds, for each run of one engine at one concurrency

    def __post_init__(self):
        bad = [c for c in self.concurrency if not is_int(c) or not 1 <= c <= MAX_CONCURRENCY]
        if not self.concurrency or bad:
            raise LlmlabError(f"--concurrency takes requests in flight from 1 to {MAX_CONCURRENCY}, got "
                              f"{bad[0] if bad else 'none'!r}")
        unknown = [e for e in self.engines if e not in ENGINES]
        if not self.engines or unknown:
            raise LlmlabError(f"unknown engine {unknown[0] if unknown else 'none'!r}; choose from: {', '.join(ENGINES)}")
        for name in ("runs", "batch1_requests", "block_size", "token_budget"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise LlmlabError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(self, name)!r}")
        if self.token_budget < max(self.concurrency):
            raise LlmlabError(f"--token-budget {self.token_budget} is below concurrency {max(self.concurrency)}: "
                              f"a step must have room for one decode token of every running request")
        if self.kv_blocks is not None and (not is_int(self.kv_blocks) or self.kv_blocks < 1):
            raise LlmlabError(f"--kv-blocks must be a whole number >= 1, got {self.kv_blocks!r}")
        if not 0 < self.time_limit < math.inf:
            raise LlmlabError(f"--time-limit must be a positive number of seconds, got {self.time_limit!r}")


@dataclass(frozen=True)
class TraceRequest:
    prompt: tuple[int, ...]
    max_new_tokens: int
    shared: bool                     # starts with the shared opening
    arrival: float | None            # seconds after the first (open loop); None: when a client is free


def make_trace(tokenizer, settings: TraceSettings, config: ModelConfig) -> list[TraceRequest]:
    """The same requests for the same settings, whatever the rate: arrivals are drawn after them. The
    shared opening is the held-out text's first tokens (the title and cast of The Winter's Tale); the
    passages come from after it. With lengths="speeches" each prompt ends where a speech of the play
    begins, and asks for as many tokens as that speech has (within --output-tokens): the outputs are
    as long as real answers, many short and a few long, not spread evenly. Refused if the model cannot
    run it: a preset takes the bundled tokenizer's ids, which must index its embedding, and every
    request must fit its context."""
    rng, s = random.Random(settings.seed), settings
    if s.lengths == "speeches":
        ids, speeches = speech_tokens(tokenizer, held_out_text())
        speeches = [(start, n) for start, n in speeches if start >= s.prompt_tokens[1]]
    else:
        ids = tokenizer.encode(held_out_text())
    opening, drawn = ids[:s.shared_prefix], []
    for _ in range(s.n_requests):
        n_prompt = rng.randint(*s.prompt_tokens)
        if s.lengths == "speeches":
            end, n_speech = speeches[rng.randrange(len(speeches))]
            start, n_new = end - n_prompt, min(max(n_speech, s.output_tokens[0]), s.output_tokens[1])
        else:
            n_new = rng.randint(*s.output_tokens)
            start = rng.randrange(s.shared_prefix, len(ids) - n_prompt)
        shared = s.shared_prefix > 0 and rng.random() < s.shared_fraction
        prompt = (opening + ids[start + s.shared_prefix:start + n_prompt]) if shared else ids[start:start + n_prompt]
        drawn.append((tuple(prompt), n_new, shared))
    largest = max(max(prompt) for prompt, _, _ in drawn)
    if largest >= config.vocab_size:
        raise LlmlabError(f"the trace's token ids reach {largest}, and the model's embedding has {config.vocab_size} "
                          f"rows: the tokenizer does not fit this model")
    longest = max(len(prompt) + n_new for prompt, n_new, _ in drawn)
    if longest > config.max_seq_len:
        raise LlmlabError(f"the trace's longest request is {longest} tokens (prompt + output), more than the model's "
                          f"context of {config.max_seq_len}: lower --prompt-tokens or --output-tokens")
    arrivals = [None] * s.n_requests
    if s.rate is not None:
        gaps = [rng.expovariate(s.rate) for _ in drawn]     # Poisson arrivals: exponential gaps
        arrivals = list(itertools.accumulate(gaps))
    return [TraceRequest(*request, arrival) for request, arrival in zip(drawn, arrivals)]


def speech_tokens(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The text's token ids, and (index of its first token, its length in tokens) for every speech: what
    a character says after their name, up to the next name (a stage direction in between counts).
    Tokenized piece by piece, names apart, so that every speech starts on a token boundary."""
    ids, starts, ends, at = [], [], [], 0
    for name in SPEECH.finditer(text):
        ids += tokenizer.encode(text[at:name.start()])
        ends.append(len(ids))
        ids += tokenizer.encode(text[name.start():name.end()])
        starts.append(len(ids))
        at = name.end()
    ids += tokenizer.encode(text[at:])
    ends.append(len(ids))
    return ids, [(start, end - start) for start, end in zip(starts, ends[1:])]


@dataclass
class Served:
    """One answered request; times are time.perf_counter()."""
    arrival: float
    first_token: float
    finish: float          # its last token
    tokens: list[int]


def _check_deadline(start: float, limit: float, where: str) -> None:
    if time.perf_counter() - start > limit:
        raise LlmlabError(f"{where} ran past --time-limit {limit:g} s: give fewer or shorter requests, or a "
                          f"longer limit")


def serve_in_batches(trace: list[TraceRequest], size: int, run_batch, limit: float,
                     where: str) -> tuple[list[Served], float]:
    """First come, first served, `size` at a time, each batch run to its end: closed loop, the next
    `size` requests, sent the moment the batch before ended; open loop, those that have arrived (up to
    size), waiting for the next arrival when none has. run_batch(batch) -> (tokens, first, last time) per
    request. Returns what was served, in trace order, and the start time."""
    served, i, start = [], 0, time.perf_counter()
    while i < len(trace):
        now = time.perf_counter()
        if trace[i].arrival is None:
            batch = trace[i:i + size]
            arrivals = [now] * len(batch)
        else:
            time.sleep(max(0.0, start + trace[i].arrival - now))
            now = time.perf_counter()
            batch = [r for r in trace[i:i + size] if start + r.arrival <= now]
            arrivals = [start + r.arrival for r in batch]
        served += [Served(a, first, last, tokens) for a, (tokens, first, last) in zip(arrivals, run_batch(batch))]
        i += len(batch)
        _check_deadline(start, limit, where)
    return served, start


def batch1(llm: LLM, log: list):
    """run_batch for llm.generate_ids, one request: its prefill and first token, then decode steps. Logs
    (forward passes, KV tokens held at the end) per request."""
    def run(batch):
        (request,) = batch
        tokens, first = [], None
        for token in llm.generate_ids(list(request.prompt), request.max_new_tokens, stop_ids=()):
            tokens.append(token)
            first = time.perf_counter() if first is None else first
        log.append((request.max_new_tokens, len(request.prompt) + request.max_new_tokens - 1))
        return [(tokens, first, time.perf_counter())]
    return run


class StepClock:
    """A logits processor that only notes when generate reaches each step: call k comes after the forward
    that gives every row its k-th token."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def hf_batches(model, log: list):
    """run_batch for transformers' generate: the batch left-padded to its longest prompt, greedy, and run
    until its longest output is done (min_new_tokens = max_new_tokens: no row stops early); only each
    request's own tokens are kept."""
    def run(batch):
        longest, n_new = max(len(r.prompt) for r in batch), max(r.max_new_tokens for r in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)   # the padding's id is masked out: any will do
        mask = torch.zeros_like(ids)
        for row, request in enumerate(batch):
            ids[row, longest - len(request.prompt):] = torch.tensor(request.prompt)
            mask[row, longest - len(request.prompt):] = 1
        clock = StepClock(model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
                                 logits_processor=[clock])
        log.append((n_new, len(batch) * (longest + n_new - 1)))    # its DynamicCache at the end, padding included
        return [(out[row, longest:longest + r.max_new_tokens].tolist(), clock.times[0], clock.times[r.max_new_tokens - 1])
                for row, r in enumerate(batch)]
    return run


def new_scheduler(llm: LLM, trace: list[TraceRequest], concurrency: int, settings: ServingSettings) -> Scheduler:
    """The scheduler of every run at one concurrency: made once, so that what it builds on first use
    (with cuda_graphs, a graph per step size) is built in the untimed round. Its pool: --kv-blocks, or
    room for C of the trace's longest requests."""
    s = settings
    n_blocks = s.kv_blocks or concurrency * -(-max(len(r.prompt) + r.max_new_tokens for r in trace) // s.block_size)
    return Scheduler(llm, n_blocks, s.block_size, max_running=concurrency, token_budget=s.token_budget)


def serve_continuously(scheduler: Scheduler, trace: list[TraceRequest], where: str,
                       time_limit: float) -> tuple[list[Served], float]:
    """The trace through the scheduler, its prefix cache emptied first: before every step, the requests
    that have arrived (open loop) or as many as keep max_running in flight (closed loop) are added. A
    request that arrived during a step is added after it, keeping its arrival time: the wait counts in
    its TTFT."""
    scheduler.blocks.reset_prefix_cache()
    scheduler.steps.clear()
    pending, requests, start = deque(enumerate(trace)), [], time.perf_counter()
    while pending or scheduler.has_work:
        now = time.perf_counter()
        while pending and (start + pending[0][1].arrival <= now if pending[0][1].arrival is not None
                           else len(scheduler.waiting) + len(scheduler.running) < scheduler.max_running):
            i, r = pending.popleft()
            requests.append(Request(i, list(r.prompt), r.max_new_tokens, stop_ids=()))
            scheduler.add(requests[-1])
            if r.arrival is not None:
                requests[-1].arrival_time = start + r.arrival
        if scheduler.has_work:
            scheduler.step()
        elif pending:
            time.sleep(max(0.0, start + pending[0][1].arrival - time.perf_counter()))
        _check_deadline(start, time_limit, where)
    return [Served(r.arrival_time, r.first_token_time, r.finish_time, r.output) for r in requests], start


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99, linear between the nearest ranks (numpy.percentile's default)."""
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def run_metrics(served: list[Served], start: float, trace: list[TraceRequest], reference) -> dict:
    """One run's figures. Every request must have made exactly the tokens it asked for."""
    if [len(s.tokens) for s in served] != [r.max_new_tokens for r in trace]:
        raise LlmlabError("an engine made a different number of tokens than the trace asked for")
    seconds, n_tokens = max(s.finish for s in served) - start, sum(len(s.tokens) for s in served)
    ttft = percentiles([s.first_token - s.arrival for s in served])
    tpot = [(s.finish - s.first_token) / (len(s.tokens) - 1) for s in served if len(s.tokens) > 1]
    tpot = percentiles(tpot) if tpot else (None, None)
    m = {"seconds": seconds, "output_tokens": n_tokens, "output_tok_s": n_tokens / seconds,
         "ttft_p50_s": ttft[0], "ttft_p99_s": ttft[1], "tpot_p50_s": tpot[0], "tpot_p99_s": tpot[1]}
    if reference is not None:      # batch-1's tokens, for the requests it served (the first ones)
        m["identical_to_batch1"] = sum(s.tokens == ref for s, ref in zip(served, reference))
    return m


def serve(engine: str, concurrency: int, runner, trace: list[TraceRequest], settings: ServingSettings,
          reference=None) -> tuple[dict, list[list[int]]]:
    """One run of one engine at one concurrency (runner: batch-1's LLM, the Scheduler of that concurrency,
    or transformers' model for hf): its figures, and every request's tokens in trace order."""
    where = f"{engine} at concurrency {concurrency}"
    if engine == "scheduler":
        blocks = runner.blocks
        queried, hit = blocks.prompt_tokens_queried, blocks.prompt_tokens_hit      # counted since it was made
        served, start = serve_continuously(runner, trace, where, settings.time_limit)
        steps = runner.steps
        peak = max(step.blocks_in_use for step in steps)
        decode_only = [step.end - step.start for step in steps if all(r.kind == "decode" for r in step.ran)]
        extra = {"forwards": len(steps), "step_seconds": sum(step.end - step.start for step in steps),
                 "decode_only_steps": len(decode_only), "decode_only_step_seconds": sum(decode_only),
                 "peak_kv_blocks": peak, "kv_blocks": blocks.n_blocks, "peak_kv_tokens": peak * blocks.block_size,
                 "prefix_hit_rate": (blocks.prompt_tokens_hit - hit) / (blocks.prompt_tokens_queried - queried),
                 "preemptions": sum(len(step.preempted) for step in steps)}
    else:
        log = []
        run_batch = batch1(runner, log) if engine == "batch-1" else hf_batches(runner, log)
        served, start = serve_in_batches(trace, 1 if engine == "batch-1" else concurrency, run_batch,
                                         settings.time_limit, where)
        extra = {"forwards": sum(f for f, _ in log), "peak_kv_tokens": max(kv for _, kv in log),
                 "prefix_hit_rate": 0.0, "preemptions": 0}
    return {**run_metrics(served, start, trace, reference), **extra}, [s.tokens for s in served]


def turns(settings: ServingSettings) -> list[tuple[str, int]]:
    """One round's runs, in the order they take turns: batch-1 once, then at each C the scheduler and hf."""
    order = [("batch-1", 1)] if "batch-1" in settings.engines else []
    return order + [(e, c) for c in settings.concurrency for e in ("scheduler", "hf") if e in settings.engines]


def measure(models: dict, trace: list[TraceRequest], settings: ServingSettings, progress=None) -> dict:
    """Every engine (models: {engine: its model}) at every concurrency, `runs` rounds in turns after an
    untimed one: {engine: {C: {"runs": [figures], "median": {figure: median}}}}. At C = 1 only the first
    batch1_requests requests are served. identical_to_batch1 is against batch-1's first run, when
    batch-1 is measured."""
    progress = progress or (lambda message: None)
    longest = max(len(r.prompt) + r.max_new_tokens - 1 for r in trace)       # the last token drawn needs no KV
    if settings.kv_blocks is not None and settings.kv_blocks * settings.block_size < longest:
        raise LlmlabError(f"--kv-blocks {settings.kv_blocks} of {settings.block_size} tokens cannot hold the trace's "
                          f"longest request ({longest} tokens of KV)")
    alone = trace[:settings.batch1_requests]
    schedulers = {c: new_scheduler(models["scheduler"], trace, c, settings) for c in settings.concurrency
                  if "scheduler" in settings.engines}
    runners = {(engine, c): schedulers[c] if engine == "scheduler" else models[engine] for engine, c in turns(settings)}
    # The untimed round builds what a first call builds. A graph-ready engine builds per shape (batch-1 a
    # decoder per cache length, the scheduler a CUDA graph per batch size), so it serves what its timed
    # runs will serve; an eager one, the first C requests cut to 4 new tokens.
    for engine, c in turns(settings):
        warm = alone if c == 1 else trace
        if engine == "hf" or not models[engine].options.graph_ready:
            warm = [dataclasses.replace(r, max_new_tokens=min(4, r.max_new_tokens)) for r in warm[:c]]
        serve(engine, c, runners[engine, c], [dataclasses.replace(r, arrival=None) for r in warm], settings)
    results, reference = {engine: {} for engine in settings.engines}, None
    for round_ in range(settings.runs):
        for engine, c in turns(settings):
            figures, tokens = serve(engine, c, runners[engine, c], alone if c == 1 else trace, settings, reference)
            if engine == "batch-1" and reference is None:
                reference, figures["identical_to_batch1"] = tokens, len(tokens)
            results[engine].setdefault(str(c), {"runs": []})["runs"].append(figures)
            progress(f"round {round_ + 1}/{settings.runs}: {engine:<9} C={c:<2} {figures['output_tok_s']:7.1f} tok/s  "
                     f"TTFT p50 {figures['ttft_p50_s']:.2f} s")
    for entry in (e for by_c in results.values() for e in by_c.values()):
        entry["median"] = {name: statistics.median(run[name] for run in entry["runs"])
                           for name, value in entry["runs"][0].items() if value is not None}
    return results


def ratios(results: dict, device_type: str) -> tuple[dict, list[dict]]:
    """Output tok/s of the scheduler over batch-1 and over hf at the same C (medians of the same rounds),
    and the device's TARGETS with whether each is met."""
    tok_s = {(engine, int(c)): entry["median"]["output_tok_s"] for engine, by_c in results.items()
             for c, entry in by_c.items()}
    out = {"scheduler_over_batch1": {}, "scheduler_over_hf": {}}
    for (engine, c), value in tok_s.items():
        if engine == "scheduler" and ("batch-1", 1) in tok_s:
            out["scheduler_over_batch1"][str(c)] = value / tok_s["batch-1", 1]
        if engine == "scheduler" and ("hf", c) in tok_s:
            out["scheduler_over_hf"][str(c)] = value / tok_s["hf", c]
    targets = [{"what": f"{a[0]} at C={a[1]} over {b[0]} at C={b[1]}, output tok/s", "target": least,
                "ratio": tok_s[a] / tok_s[b], "met": tok_s[a] / tok_s[b] >= least}
               for a, b, least in TARGETS.get(device_type, ()) if a in tok_s and b in tok_s]
    return out, targets


def method_text(trace: TraceSettings, settings: ServingSettings, models: dict, threads: int,
                hf_version: str | None) -> str:
    t, s, llm = trace, settings, models["scheduler"]
    n_alone = min(s.batch1_requests, t.n_requests)
    pool = (f"{s.kv_blocks} blocks" if s.kv_blocks else "C x the blocks of the trace's longest request (prompt + "
            "output), so none is ever preempted")
    arrivals = ("closed loop: C clients, each sending its next request the moment its last one is answered, so C "
                "requests are in flight" if t.rate is None else
                f"open loop: Poisson arrivals at {t.rate:g} requests/s (exponential gaps drawn with the trace), "
                f"whether the engine keeps up or not; C bounds what runs at once")
    weights = "random weights of that shape" if llm.source.startswith("preset:") else "its weights"
    outputs = (f"outputs of {t.output_tokens[0]}-{t.output_tokens[1]} tokens (uniform)" if t.lengths == "uniform" else
               f"each prompt ends where a speech of the play begins (after the speaker's name) and asks for as many "
               f"tokens as that speech has, held within {t.output_tokens[0]}-{t.output_tokens[1]}: output lengths "
               f"of real text (speeches drawn uniformly among those at least {t.prompt_tokens[1]} tokens in)")
    text = (
        f"In-process load generator: the engines' Python APIs are called directly, no HTTP (a transport would "
        f"cost every engine the same). Model {llm.source} ({weights}), {threads} threads. "
        f"Trace ({t.n_requests} requests, seed {t.seed}): prompts of {t.prompt_tokens[0]}-{t.prompt_tokens[1]} "
        f"tokens (uniform), each a passage of the held-out plays ({', '.join(HELD_OUT_PLAYS)}) at a random place, "
        f"tokenized by llmlab; on {t.shared_fraction:.0%} of them (drawn per request) the first {t.shared_prefix} "
        f"tokens are the same opening (the held-out text's first {t.shared_prefix} tokens), standing in for a "
        f"system prompt; {outputs}, greedy, no stop "
        f"token, so every engine makes exactly the tokens asked for. Arrivals: {arrivals}. Every run at C = 1 "
        f"(batch-1's, and the others' at C = 1) serves only the trace's first {n_alone} requests, one "
        f"at a time: its tok/s is a rate over that sample of the trace; every other run serves the whole trace. ")
    if "batch-1" in s.engines:
        text += (f"batch-1: llm.generate_ids, one request at a time, as {models['batch-1'].options.name()} (eager: "
                 f"a static KV cache of prompt + output; graph-ready: the fixed-shape step over a cache bucket). ")
    text += (
        f"scheduler: llmlab.serve.scheduler.Scheduler(max_running=C, token_budget={s.token_budget}, block_size="
        f"{s.block_size}) over {llm.options.name()}, pool of {pool}, one per C, its prefix cache emptied before "
        f"each run (its CUDA graphs, with cuda_graphs, are kept: captured in the untimed round); the load "
        f"generator adds the requests that have arrived before every step, so one arriving during a step waits "
        f"for its end. ")
    if "hf" in s.engines:
        text += (
            f"hf: transformers {hf_version} loading the same model file in {llm.options.model_dtype}, generate() "
            f"on static batches of C requests in trace order (open loop: those that have arrived, up to C), "
            f"left-padded to the batch's longest prompt with an attention mask, greedy, min_new_tokens = "
            f"max_new_tokens = the batch's longest output, so every row runs until the longest is done; only the "
            f"tokens each request asked for are kept and counted (min_new_tokens also bars the end-of-text token, "
            f"which llmlab makes and goes on from); its tokens are timed at the step that makes them (a logits "
            f"processor that only reads the clock), as if streamed. ")
    return text + (
        f"Figures per run: output tok/s = tokens asked for (each engine made exactly those) / wall seconds from "
        f"the first request sent to the last token made, prefills included; TTFT = time of the first token - "
        f"arrival; TPOT = (time of the last token - time of the first) / (tokens - 1), per request; p50 and p99 "
        f"over the requests by numpy.percentile (linear; with few requests p99 lies near the slowest). "
        f"peak_kv_tokens: KV slots held at the most: scheduler, the most blocks in use in any step x block_size; "
        f"batch-1, the longest request's prompt + output - 1; hf, batch x (longest prompt + longest output - 1), "
        f"its DynamicCache at the end of the largest batch, padding included; kv_bytes_per_token converts them "
        f"(in the scheduler's dtype). prefix_hit_rate: prompt tokens found in the prefix cache / prompt tokens "
        f"admitted. forwards: model forward passes (the scheduler's steps). The scheduler's step_seconds: time "
        f"inside its steps; decode_only_step_seconds: of it, in the decode_only_steps (those that ran no prompt "
        f"chunk). identical_to_batch1: requests whose tokens equal batch-1's first run, of the "
        f"{n_alone} it served. One untimed round first (each engine at each of its C over the first C "
        f"requests cut to 4 new tokens; a graph-ready one, which builds per shape, over what its timed runs "
        f"serve, whole), then {s.runs} rounds; each round runs batch-1 once, "
        f"then at each C the scheduler, then hf; medians over rounds; ratios of medians measured in the same "
        f"rounds. Timer: time.perf_counter.")


def run(model: str | None = None, trace: TraceSettings = TraceSettings(), settings: ServingSettings = ServingSettings(),
        engine: EngineOptions = EngineOptions(), batch1_engine: EngineOptions = EngineOptions(),
        device: str = "cpu", threads: int = 2, progress=None) -> dict:
    """Load the model for the scheduler (engine's switches), again for batch-1 if its switches differ,
    and transformers' copy for hf; make the trace, measure; the report as a plain dict."""
    progress = progress or (lambda message: None)
    try:
        check_serve_options(engine)
    except LlmlabError as e:
        raise LlmlabError(f"the scheduler's switches (--engine) {engine.name()}: {e}") from None
    if "hf" in settings.engines and str(model).startswith("preset:"):
        raise LlmlabError(f"hf: {model} has random weights and no file for transformers to load, so there is no "
                          f"reference to run; leave hf out: --engines batch-1,scheduler")
    dev = parse_device(device)
    if not is_int(threads) or threads < 1:
        raise LlmlabError(f"--threads must be a whole number >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models, load_seconds = {}, {}
        for role, options in (("scheduler", engine), ("batch-1", batch1_engine)):   # the scheduler's makes the trace
            if role == "batch-1" and "batch-1" not in settings.engines:
                continue
            if role == "batch-1" and options == engine:
                models[role] = models["scheduler"]          # the same switches: one copy serves both
                continue
            progress(f"loading {model or 'the bundled SmolLM2'} on {dev} as {options.name()} for {role}")
            start = time.perf_counter()
            models[role] = load(model, device=str(dev), **dataclasses.asdict(options))
            load_seconds[role] = time.perf_counter() - start
        llm = models["scheduler"]
        if "hf" in settings.engines:
            start = time.perf_counter()
            models["hf"] = load_hf_model(llm.source, llm.config, llm.dtype, dev)
            load_seconds["hf"] = time.perf_counter() - start
        if llm.tokenizer is None:
            raise LlmlabError(f"{llm.source} has no tokenizer to make the trace with (a preset takes the bundled "
                              f"SmolLM2's: install it)")
        requests = make_trace(llm.tokenizer, trace, llm.config)
        load_before = _warn_if_busy(dev, progress)
        results = measure(models, requests, settings, progress)
        load_after = load_average()
    finally:
        torch.set_num_threads(previous)
    v = versions(with_transformers="hf" in models)
    ratio, targets = ratios(results, dev.type)
    llmlab_roles = [role for role in ("scheduler", "batch-1") if role in models]
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dev), "device_type": dev.type, "threads": threads, "versions": v,
        "model": llm.source, "dtype": llm.options.model_dtype,
        # the switches given for each llmlab engine, and every option they came to
        "engine_switches": {role: models[role].options.changed() for role in llmlab_roles},
        "engine_options": {role: models[role].options.as_dict() for role in llmlab_roles},
        "kv_bytes_per_token": llm.config.kv_cache_bytes(1, bytes_per_value=llm.dtype.itemsize),
        "settings": {"trace": dataclasses.asdict(trace), **dataclasses.asdict(settings)},
        "method": method_text(trace, settings, models, threads, v.get("transformers")),
        "load_seconds": load_seconds,
        # the 1-minute load average: well above 0 before the runs means other work shared the CPUs
        "load_average": {"before": load_before, "after": load_after, "n_cpus": os.cpu_count()},
        "trace": {"prompt_tokens": [len(r.prompt) for r in requests],
                  "output_tokens": [r.max_new_tokens for r in requests],
                  "shared_prefix": [r.shared for r in requests], "arrival_s": [r.arrival for r in requests]},
        "results": results, "ratios": ratio, "targets": targets,
    }


def format_table(report: dict) -> str:
    load, settings = report["load_average"], report["settings"]
    n_alone = min(settings["batch1_requests"], settings["trace"]["n_requests"])
    lines = [f"{report['device']}, {report['threads']} threads, {os.path.basename(report['model'])} in "
             f"{report['dtype']}; median of {settings['runs']} runs; 1-minute load average {load['before'] or 0:.2f} "
             f"before, {load['after'] or 0:.2f} after; C=1 serves the first {n_alone} requests",
             f"{'engine':<10}{'C':>3}{'tok/s':>9}{'TTFT p50/p99 s':>17}{'TPOT p50/p99 ms':>18}{'peak KV MB':>12}"
             f"{'hit':>6}{'preempt':>9}{'forwards':>10}{'=batch-1':>10}"]
    rows = sorted((int(c), ENGINES.index(engine), engine) for engine, by_c in report["results"].items() for c in by_c)
    for c, _, engine in rows:
        m = report["results"][engine][str(c)]["median"]
        tpot = f"{1e3 * m['tpot_p50_s']:.0f} / {1e3 * m['tpot_p99_s']:.0f}" if "tpot_p50_s" in m else "-"
        same = f"{m['identical_to_batch1']:.0f}/{n_alone}" if "identical_to_batch1" in m else "-"
        lines.append(f"{engine:<10}{c:>3}{m['output_tok_s']:>9.1f}{m['ttft_p50_s']:>8.2f} /{m['ttft_p99_s']:>7.2f}"
                     f"{tpot:>18}{m['peak_kv_tokens'] * report['kv_bytes_per_token'] / 1e6:>12.1f}"
                     f"{100 * m['prefix_hit_rate']:>5.0f}%{m['preemptions']:>9.0f}{m['forwards']:>10.0f}{same:>10}")
    for t in report["targets"]:
        lines.append(f"{t['what']}: {t['ratio']:.2f}x (target {t['target']}x: {'met' if t['met'] else 'missed'})")
    return "\n".join(lines)


def _whole_numbers(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise LlmlabError(f"{flag} {text!r}: give whole numbers separated by commas, e.g. 1,4,16") from None


def _engine_options(spec: str | None, flag: str, dtype: str | None) -> EngineOptions:
    """EngineOptions from a switches text (llmlab bench --engine's form) over --dtype."""
    own = parse_engine_spec(spec, flag) if spec else {}
    try:
        return engine_options(**with_base({"dtype": dtype} if dtype else {}, own))
    except LlmlabError as e:
        raise LlmlabError(f"{flag} {spec!r}: {e}" if spec else str(e)) from None


def main(argv: list[str] | None = None, prog: str = "python -m llmlab.bench.serving") -> int:
    T, S = TraceSettings, ServingSettings       # the defaults are declared once, there
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="what llmlab.load reads: a .gguf file, a Hugging Face folder, preset:NAME "
                                        "(random weights) or student:NAME (default: the bundled SmolLM2)")
    parser.add_argument("--engine", metavar="SWITCHES", help="the scheduler's model's switches, as llmlab bench "
                                                             "--engine takes them, e.g. cuda_graphs=true")
    parser.add_argument("--batch1-engine", metavar="SWITCHES",
                        help="batch-1's switches (a second copy of the model when they differ), e.g. "
                             "kernels=fused-decode,cuda_graphs=true,steps_per_graph=8 (default: the eager loop)")
    parser.add_argument("--dtype", help="under both switch sets (default fp32)")
    parser.add_argument("--concurrency", default=",".join(map(str, S.concurrency)),
                        help=f"requests in flight, comma-separated, 1 to {MAX_CONCURRENCY}")
    parser.add_argument("--engines", default=",".join(S.engines), help=f"some of {', '.join(ENGINES)}")
    parser.add_argument("--requests", type=int, default=T.n_requests, help=f"the trace's length, at most {MAX_REQUESTS}")
    parser.add_argument("--batch1-requests", type=int, default=S.batch1_requests,
                        help="the C = 1 runs serve the trace's first N requests (default %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=T.prompt_tokens, metavar=("LEAST", "MOST"))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=T.output_tokens, metavar=("LEAST", "MOST"))
    parser.add_argument("--lengths", choices=LENGTHS, default=T.lengths,
                        help="output lengths: uniform in --output-tokens, or those of the play's speeches that follow "
                             "each prompt (held within --output-tokens)")
    parser.add_argument("--shared-prefix", type=int, default=T.shared_prefix, help="tokens of the shared opening")
    parser.add_argument("--shared-fraction", type=float, default=T.shared_fraction)
    parser.add_argument("--rate", type=float, help="requests per second, Poisson arrivals (open loop); "
                                                   "left out: a closed loop of C clients")
    parser.add_argument("--seed", type=int, default=T.seed)
    parser.add_argument("--runs", type=int, default=S.runs)
    parser.add_argument("--block-size", type=int, default=S.block_size)
    parser.add_argument("--token-budget", type=int, default=S.token_budget)
    parser.add_argument("--kv-blocks", type=int, help="the scheduler's KV pool (default: no preemption)")
    parser.add_argument("--time-limit", type=float, default=S.time_limit, help="seconds per run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    try:
        trace = TraceSettings(args.requests, tuple(args.prompt_tokens), tuple(args.output_tokens), args.shared_prefix,
                              args.shared_fraction, args.rate, args.seed, args.lengths)
        settings = ServingSettings(_whole_numbers(args.concurrency, "--concurrency"), tuple(args.engines.split(",")),
                                   args.runs, args.batch1_requests, args.block_size, args.token_budget,
                                   args.kv_blocks, args.time_limit)
        engine = _engine_options(args.engine, "--engine", args.dtype)
        batch1_engine = _engine_options(args.batch1_engine, "--batch1-engine", args.dtype)
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise LlmlabError(f"--json {args.json}: its folder does not exist")
        report = run(args.model, trace, settings, engine, batch1_engine, args.device, args.threads, stderr_progress)
        print(format_table(report))
        if args.json:
            write_json(report, args.json)
    except LlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
