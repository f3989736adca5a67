"""What compiling the decode step costs, cold and warm.

torch.compile pays twice on a first call: dynamo traces the Python into a graph, then inductor
generates and builds kernels for it (C++ on a CPU, Triton on a GPU, autotuned when asked). Inductor
keeps what it built on disk, in TORCHINDUCTOR_CACHE_DIR (default: <tmp>/torchinductor_<user>; the
FX-graph cache, the built kernels, Triton's own cache under triton/ unless TRITON_CACHE_DIR says
otherwise, and autotuning results), read again by any later process that compiles the same graph:

    cold   the first call of a fresh Decoder, inductor's cache pointed at a new empty folder and its
           in-memory caches cleared: trace + generate + build (+ autotune), what a first run ever pays
    warm   torch._dynamo.reset() (every compiled frame forgotten, in-memory caches cleared), then a
           second fresh Decoder's first call, with that folder now full: trace + cache look-up, what
           every later run of the same shapes pays; fxgraph_cache_hit counts inductor's hits
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..llm import LLM
from ..sampling import SamplingParams
from ..step import Decoder, bucket

CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def _clear_in_memory_caches() -> None:
    from torch._inductor import utils

    clear = getattr(utils, "clear_caches", None) or utils.clear_inductor_caches     # the older name
    clear()


@contextlib.contextmanager
def inductor_cache(folder: str | os.PathLike | None):
    """Inductor's (and Triton's) on-disk cache in `folder` while inside; None: leave them as they are.
    Both are environment variables, read each time a compile looks for its cache, so this holds for
    compiles started inside; Triton pins TRITON_CACHE_DIR at its first compile unless it is set, so
    both are set here."""
    if folder is None:
        yield
        return
    saved = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(Path(folder) / "triton")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _counter(name: str) -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"][name]


@torch.inference_mode()
def compile_seconds(llm: LLM, ids: list[int], folder: str | os.PathLike) -> dict:
    """Cold and warm seconds of a fresh Decoder's first call (see the module's docstring); `folder`
    must be new and empty. The decoders made here are dropped; later compiles of the same step in
    `folder` are warm."""
    prompt = torch.tensor([ids], dtype=torch.long, device=llm.device)
    max_len = bucket(len(ids) + 2 * llm.options.steps_per_graph)

    def first_call() -> float:
        decoder = Decoder(llm.model, llm.options, SamplingParams(), 1, max_len)
        decoder.start(prompt, seed=0)
        decoder.next_tokens()       # compiles (timed by the decoder itself), captures if asked, runs
        return decoder.compile_seconds

    with inductor_cache(folder):
        torch._dynamo.reset()
        _clear_in_memory_caches()
        misses = _counter("fxgraph_cache_miss")
        cold = first_call()
        misses = _counter("fxgraph_cache_miss") - misses
        torch._dynamo.reset()
        _clear_in_memory_caches()
        hits = _counter("fxgraph_cache_hit")
        warm = first_call()
        hits = _counter("fxgraph_cache_hit") - hits
    return {"cold": cold, "warm": warm, "fxgraph_cache_hit": hits, "fxgraph_cache_miss_cold": misses}
