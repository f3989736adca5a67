"""The fixed-shape decode step, and the three ways to run it: eagerly, compiled, replayed from a CUDA graph.

One step takes the current token of each sequence (batch, 1) at its position (batch,), runs the model
over the whole static KV cache under a mask, samples the next token on the device, and writes it back
into the same `token` buffer while `pos` moves on by one, in place. Nothing in it has a shape that
depends on the step, and nothing waits for the host:

    eager           the step as Python calls it: the readable reference, one kernel launch per op
    compiled        torch.compile(fullgraph=True) traces it once into a graph; inductor fuses the
                    elementwise ops into a few generated kernels (Triton on GPU, C++/OpenMP on CPU)
    CUDA graph      the launches of one call are recorded once (torch.cuda.CUDAGraph) and replayed with
                    one call from the host; the buffers are static, which is why the step writes in place
    fused-decode    the model's part of the step as five hand-fused Triton kernels per layer
                    (llmlab.fused_decode), eager or replayed from a CUDA graph
    steps_per_graph k steps per compiled call or replay: the host wakes once every k tokens (it checks
                    for stop tokens then, and discards what followed a stop)

The cache is allocated at a bucketed length (a multiple of 256), so generations of nearby lengths share
one compiled graph and its captures, instead of recompiling for each length.
"""

from __future__ import annotations

import time

import torch

from . import fused_decode
from .errors import LlmlabError
from .kv_cache import KVCache, QuantizedKVCache, make_cache
from .model import Transformer
from .options import EngineOptions
from .sampling import SamplingParams, int64_seed, sample_on_device

MIN_BUCKET = 256
WARMUP_CALLS = 3        # calls before a capture: compile, autotune, and let the allocator settle


def bucket(n_tokens: int) -> int:
    """The cache length for a generation of n_tokens: rounded up to a multiple of MIN_BUCKET (256).

    Every step attends over the whole bucket, written or not, so a step costs what its bucket holds: a
    640-token generation in a power-of-two bucket attended over 1024 slots, 1.3 ms of its 8.4 ms per
    token on a 2-core CPU (measured, SmolLM2 int4, compiled). Multiples of 256, as llama.cpp pads the
    part of its KV cache it reads; the price is a compiled graph (or capture) per 256 tokens of length."""
    return max(MIN_BUCKET, -(-n_tokens // MIN_BUCKET) * MIN_BUCKET)


def compile_options(mode: str) -> dict:
    """torch.compile keyword arguments for a compile= switch (the modes given as their options)."""
    options = {"default": {}, "reduce-overhead": {"triton.cudagraphs": True},
               "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True}}[mode]
    return {"fullgraph": True, "dynamic": False, "options": options}


# Every Decoder compiles the same code object (_one_step) with guards on its own buffers, so each one
# made in a process takes a slot of dynamo's per-code recompile limit (8 by default); past the limit
# dynamo would silently run the step eagerly. Allow more, and fail loudly instead of falling back.
RECOMPILE_LIMIT = 64


def allow_recompiles() -> None:
    import torch._dynamo.config as dynamo
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    dynamo.fail_on_recompile_limit_hit = True


class Decoder:
    """The state of one batch of generations on the fixed-shape path, and its step, run as the options say.

    Made once per (batch, cache length) and reused: `start` prefills new prompts into it, `next_tokens`
    runs steps_per_graph steps and returns their tokens (batch, steps_per_graph), still on the device.
    """

    def __init__(self, model: Transformer, options: EngineOptions, params: SamplingParams, batch: int, max_len: int):
        self.model, self.options, self.params = model, options, params
        config, device, dtype = model.config, model.embed.weight.device, model.embed.weight.dtype
        if options.cuda_graphs and device.type != "cuda":
            raise LlmlabError(f"cuda_graphs=True needs a CUDA device; this model is on {device}")
        self.k = options.steps_per_graph
        model.make_rope_table(extra_positions=self.k)
        self.cache: KVCache | QuantizedKVCache = make_cache(options.kv_cache, config, max_len, dtype, device, batch=batch)
        if options.kernels == "fused-decode":
            fused_decode.check_fusable(model, self.cache)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.seed = torch.zeros(batch, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch, config.vocab_size, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, self.k, dtype=torch.long, device=device)
        self.step = self._one_step
        if options.compile != "none":
            allow_recompiles()
            self.step = torch.compile(self._one_step, **compile_options(options.compile))
        self.graph = None
        self.compile_seconds = None      # the first call's time (tracing and code generation), once made

    def _one_step(self) -> torch.Tensor:
        """One decode step, in place: feeds `token` at `pos`, leaves the next token in `token`, pos + 1."""
        if self.options.kernels == "fused-decode":
            logits = fused_decode.decode_logits(self.model, self.token, self.pos, self.cache)
        else:
            logits = self.model(self.token, start_pos=self.pos, cache=self.cache, last_only=True)[:, -1]
        nxt = sample_on_device(logits, self.params, self.seed, self.pos + 1, self.seen)   # (batch,)
        self.seen.scatter_(1, nxt[:, None], True)
        self.token.copy_(nxt[:, None])
        self.pos.add_(1)
        return nxt

    def run(self) -> torch.Tensor:
        """k steps; the i-th new token of each row lands in out[:, i]. The step is compiled once and
        called k times (unrolling k steps into one compiled graph would multiply the compile time by k);
        a CUDA graph captures all k calls."""
        for i in range(self.k):
            self.out[:, i].copy_(self.step())
        return self.out

    @torch.inference_mode()
    def start(self, prompts: torch.Tensor, seed: int) -> torch.Tensor:
        """Prefill prompts (batch, prompt_len) into the cache (eagerly: its shape is the prompt's) and
        draw each row's first new token; returns it (batch,)."""
        batch, n = prompts.shape
        logits = self.model(prompts, start_pos=0, cache=self.cache, last_only=True)[:, -1]
        self.seen.zero_().scatter_(1, prompts, True)
        self.pos.fill_(n)
        self.seed.fill_(int64_seed(seed))
        first = sample_on_device(logits, self.params, self.seed, self.pos, self.seen)
        self.seen.scatter_(1, first[:, None], True)
        self.token.copy_(first[:, None])
        return first

    @torch.inference_mode()
    def next_tokens(self) -> torch.Tensor:
        """The next steps_per_graph tokens of every row, (batch, steps_per_graph), without a host sync."""
        if self.compile_seconds is None:
            self._warm_up()
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self.run()

    def _warm_up(self) -> None:
        """Compile (timed), then capture if asked. The warm-up calls write the cache at positions after
        the current ones and move the state on; the state is put back afterwards, and each later step
        overwrites the slot it reads before reading it, so the extra writes are never seen."""
        saved = [t.clone() for t in (self.token, self.pos, self.seen)]
        device = self.token.device
        start = time.perf_counter()
        self.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.compile_seconds = time.perf_counter() - start
        if self.options.cuda_graphs:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):       # warm-up on a side stream, as capture requires
                for _ in range(WARMUP_CALLS):
                    self.run()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.run()
        for buffer, value in zip((self.token, self.pos, self.seen), saved):
            buffer.copy_(value)
