"""Where the time goes: per-stage timers around one real generation, and FLOP and byte counts per stage.

`profile_generation` runs the engine's own eager loop (llmlab.generate: `prefill`, `decode_one_token`,
`sample_on_device`) with a timer listening to the stage markers of `Transformer.forward`
(llmlab.stages). What is timed is the real forward under whatever switches the model was loaded
with (attention backend, Triton or PyTorch kernels, fused projections, weight format, KV cache), so
the tokens and logits are the engine's, bit for bit. The stages:

    tokenization   text -> ids (prefill only)
    embedding      ids -> rows of the embedding table
    norms          every RMSNorm: two per layer and the final one (with kernels="triton" the residual
                   add before each MLP norm is fused into it, so that add is timed here)
    qkv_projections  x W_q^T, x W_k^T, x W_v^T (one matmul when fused)
    rope           the cos/sin angles and their rotation of q and k (in place with kernels="triton")
    kv_cache       allocating the cache (prefill) and writing the new keys and values into it
    attention_core scores, softmax and the weighted sum of values (the attention backend)
    output_projection  W_o
    mlp            SwiGLU: W_down (silu(W_gate x) * W_up x)
    residual       the residual additions: two per layer, one with kernels="triton"
    lm_head        final hidden state -> logits, last position only
    sampling       logits -> next token id (and the record of tokens seen, for the repetition penalty)
    python_overhead  the step's wall time minus all the stages above: the interpreter, the loop,
                   and on a GPU the time the GPU waits for kernels to be launched

With nobody listening the markers do nothing, so profiling off changes nothing and costs nothing.
On CUDA each stage is timed with a pair of CUDA events (GPU time) and the step is synchronised once,
at its end; on CPU with time.perf_counter. Profiling on has a cost of its own, a timer around each of
~10 stages per layer per step: on an H200 (SmolLM2's shape, random weights, bf16) a profiled decode
step took 24-28 ms against 16.5 ms plain, since this small model is bound by kernel launches and the
event records add to them. The stage shares are meaningful, the absolute tok/s of a profiled run
less so (`llmlab bench --roofline` measures the difference on each machine).

A compiled or CUDA-graphed model (`compile=` or `cuda_graphs=True`) runs its decode step as fused
kernels or one graph replay, inside which no per-stage timer can see: `profile_generation` refuses it
and says to profile the same model loaded eagerly, whose stages are the ones the graph was made of.

`stage_costs` counts FLOPs and bytes per stage, so each stage gets an arithmetic intensity (FLOPs
per byte moved), the x axis of a roofline plot: from a config alone (every weight stored in one float
format), or priced by the model as loaded (`stage_weight_bytes`: int4 weights at half a byte plus their
scales) and the cache as allocated (`kv_bytes_per_value`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ModelConfig
from .errors import LlmlabError
from .generate import decode_one_token, prefill
from .kv_cache import KVCache, make_cache
from .quant.linear import Int4Linear
from .sampling import SamplingParams, int64_seed, sample_on_device
from .stages import listening

STAGES = ("tokenization", "embedding", "norms", "qkv_projections", "rope", "kv_cache", "attention_core",
          "output_projection", "mlp", "residual", "lm_head", "sampling")
OVERHEAD = "python_overhead"


class StageTimer:
    """Adds up the time of each stage over one step: CUDA events on a GPU, perf_counter on a CPU.

    `timer.stage` is the listener (llmlab.stages.listening): `timer.stage(name)` is the context that
    times one stage. Stages follow one another and never nest (a nested one would be counted twice),
    so one open stage at a time is all a timer keeps."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._open: str | None = None
        self._start = None

    def stage(self, name: str) -> StageTimer:
        if self._open is not None:
            raise RuntimeError(f"stage {name!r} started inside stage {self._open!r}: stages must not nest")
        self._open = name
        return self

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._open, self._start, end))
        else:
            self.seconds[self._open] += time.perf_counter() - self._start
        self._open = None

    def finish(self) -> dict[str, float]:
        """Stage -> seconds since the last finish, and start afresh; on CUDA this is the one
        synchronisation of the step."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.seconds[name] += start.elapsed_time(end) / 1e3     # elapsed_time is in ms
        seconds, self.seconds, self.events = dict(self.seconds), defaultdict(float), []
        return seconds


# --- FLOPs and bytes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageCost:
    """FLOPs and bytes moved by one stage in one step."""

    flops: float
    weight_bytes: float          # parameters read
    activation_bytes: float      # activations and KV cache read and written

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte: below the machine's FLOPs/bandwidth ratio a stage is
        memory bound, above it compute bound."""
        return self.flops / self.bytes if self.bytes else 0.0


WEIGHT_STAGES = ("embedding", "norms", "qkv_projections", "output_projection", "mlp", "lm_head")


def summed_widths(config: ModelConfig) -> tuple[int, int, int]:
    """The query width (heads x head_dim), key/value width and MLP width, each summed over the layers:
    every per-layer count below is linear in them, so these sums price layers of different widths
    (a structurally pruned model) as well as equal ones (n_layers x the width)."""
    layers, hd = range(config.n_layers), config.head_dim
    return (sum(config.heads_of(i) for i in layers) * hd, sum(config.kv_heads_of(i) for i in layers) * hd,
            sum(config.ffn_dim_of(i) for i in layers))


def dense_weight_bytes(config: ModelConfig, itemsize: int) -> dict[str, float]:
    """Bytes of each stage's weights, every weight stored in one float format of `itemsize` bytes;
    "embedding" is the whole table (a step reads only its tokens' rows of it)."""
    d, layers = config.dim, config.n_layers
    q_dims, kv_dims, ffn_dims = summed_widths(config)
    return {name: count * itemsize for name, count in {
        "embedding": config.vocab_size * d,
        "norms": (2 * layers + 1) * d,
        "qkv_projections": d * (q_dims + 2 * kv_dims),
        "output_projection": q_dims * d,
        "mlp": 3 * d * ffn_dims,
        "lm_head": config.vocab_size * d,
    }.items()}


def stored_bytes(module: nn.Module) -> int:
    """Bytes one call of a layer reads of its weights, as stored: a float weight's, or a quantized
    layer's codes with their scales (and offsets). Int4Linear keeps a second copy of the same size in
    the CPU kernel's tiled layout; a matmul reads one of the two, so one is counted."""
    if isinstance(module, Int4Linear):
        tensors = (module.packed, module.scales, module.offsets)
    else:
        tensors = (*module.parameters(), *module.buffers())
    return sum(t.nbytes for t in tensors)


def stage_weight_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes of each stage's weights in the model as loaded (whatever their format), summed over the
    layers; "embedding" is the whole table. A tied LM head reads the embedding's matrix."""
    blocks = model.layers
    modules = {
        "embedding": [model.embed],
        "norms": [model.norm, *(b.attn_norm for b in blocks), *(b.mlp_norm for b in blocks)],
        "qkv_projections": [m for b in blocks for m in (b.attention.wq, b.attention.wk, b.attention.wv)],
        "output_projection": [b.attention.wo for b in blocks],
        "mlp": [m for b in blocks for m in (b.mlp.w_gate, b.mlp.w_up, b.mlp.w_down)],
        "lm_head": [model.head],
    }
    return {name: sum(stored_bytes(m) for m in parts) for name, parts in modules.items()}


def kv_bytes_per_value(cache) -> float:
    """Bytes the cache stores per key or value element: the dtype's size, or for the int8 cache one
    byte plus its share of the per-vector fp32 scale. A paged cache's are its pool's."""
    if hasattr(cache, "pool"):
        return cache.pool.nbytes / sum(t.numel() for t in cache.pool.k + cache.pool.v)
    return cache.nbytes / sum(t.numel() for t in cache.keys + cache.values)


def stage_costs(config: ModelConfig, n_new: int, context: int, itemsize: int = 4,
                weight_bytes: dict[str, float] | None = None, kv_itemsize: float | None = None,
                fused_residual: bool = False) -> dict[str, StageCost]:
    """FLOPs and bytes of each stage for one forward step: n_new tokens whose last one sits at
    position context - 1 (prefill of n tokens: n_new = context = n; one decode step: n_new = 1).

    itemsize: bytes per activation value, and per weight when `weight_bytes` is not given (a model
    whose weights are all stored in that float format). weight_bytes: each stage's weight bytes as
    stored (`stage_weight_bytes(model)`, which prices int8/int4/fp8 weights with their scales).
    kv_itemsize: bytes per value stored in the KV cache (`kv_bytes_per_value(cache)`; default:
    itemsize). fused_residual: the residual add before each MLP norm is done inside the norm
    (kernels="triton"), so its FLOPs and bytes count under "norms".

    Assumptions, the usual ones of a roofline estimate:
    - a matmul (m, k) x (k, n) is 2 m n k FLOPs; matmul stages (projections, attention core, MLP,
      LM head) count matmul FLOPs only: softmax, silu and the gate product add under 2 %;
    - the attention core counts the full (n_new x context) score rectangle, as the kernels compute
      it, once per query head (grouped-query heads read shared keys but do their own products);
    - elementwise stages count one FLOP per arithmetic operation per element (RMSNorm 4, RoPE 3,
      residual 1) and no FLOPs for lookups, copies and the cos/sin tables;
    - every weight is read from memory once per step and every activation is read once and written
      once (no cache reuse between stages); the embedding reads only the rows of the n_new tokens;
      the LM head reads its whole matrix (the embedding's, when tied) for the last position only;
    - the KV cache is written once (the new keys and values) and read once by the attention core, at
      its stored size: the copies a cache makes of what it returns (an int8 cache dequantized, a paged
      cache's blocks gathered) are not counted; sampling reads fp32 logits (greedy argmax).
    """
    d, layers, vocab, hd = config.dim, config.n_layers, config.vocab_size, config.head_dim
    # q, kv, ffn: widths summed over the layers (summed_widths), so every term below is the whole
    # model's; a term without them (layers * ...) is the same in every layer
    q, kv, ffn = summed_widths(config)
    n, s = n_new, itemsize
    kv_s = itemsize if kv_itemsize is None else kv_itemsize
    w = dense_weight_bytes(config, itemsize) if weight_bytes is None else weight_bytes

    n_norms = 2 * layers + 1
    norms = StageCost(n_norms * 4 * n * d, w["norms"], n_norms * 2 * n * d * s)
    residual = StageCost(layers * 2 * n * d, 0, layers * 6 * n * d * s)
    if fused_residual:                 # one add of each layer moves into the norm: reads x, writes h
        norms = StageCost(norms.flops + layers * n * d, norms.weight_bytes, norms.activation_bytes + layers * 2 * n * d * s)
        residual = StageCost(layers * n * d, 0, layers * 3 * n * d * s)
    return {
        "tokenization": StageCost(0, 0, 0),
        "embedding": StageCost(0, w["embedding"] * n / vocab, n * d * s),
        "norms": norms,
        "qkv_projections": StageCost(2 * n * d * (q + 2 * kv), w["qkv_projections"],
                                     (layers * n * d + n * (q + 2 * kv)) * s),
        "rope": StageCost(3 * n * (q + kv), 0, (2 * n * (q + kv) + layers * 2 * n * hd) * s),
        "kv_cache": StageCost(0, 0, 2 * n * kv * kv_s),
        "attention_core": StageCost(4 * n * context * q, 0, 2 * n * q * s + 2 * context * kv * kv_s),
        "output_projection": StageCost(2 * n * q * d, w["output_projection"], (n * q + layers * n * d) * s),
        "mlp": StageCost(6 * n * d * ffn, w["mlp"], (layers * 2 * n * d + 3 * n * ffn) * s),
        "residual": residual,
        "lm_head": StageCost(2 * d * vocab, w["lm_head"], (d + vocab) * s),
        "sampling": StageCost(vocab, 0, vocab * 4),
    }


def model_stage_costs(model: nn.Module, cache=None):
    """stage_costs priced by the model as loaded and the cache as allocated: a function
    (n_new, context) -> costs. Weight bytes are summed once, here."""
    weight_bytes = stage_weight_bytes(model)
    itemsize = model.embed.weight.element_size()
    kv_itemsize = None if cache is None else kv_bytes_per_value(cache)
    fused_residual = model.layers[0].mlp_norm.kernels == "triton"     # as Block.forward decides
    return lambda n_new, context: stage_costs(model.config, n_new, context, itemsize, weight_bytes,
                                              kv_itemsize, fused_residual)


def _mean_costs(steps: list[dict[str, StageCost]]) -> dict[str, StageCost]:
    return {name: StageCost(*(sum(getattr(step[name], f) for step in steps) / max(len(steps), 1)
                              for f in ("flops", "weight_bytes", "activation_bytes")))
            for name in STAGES}


# --- the profile ---------------------------------------------------------------------------------

@dataclass
class Profile:
    """One profiled generation. Times are seconds: `prefill` for the whole prefill (tokenization to
    first token), `decode` the mean per decode step (one new token); both map every stage and
    `python_overhead` to seconds and sum to `prefill_wall` / `decode_wall`. `decode_steps` keeps each
    step's times, to plot against the growing context. Costs: FLOPs and bytes per stage, for the
    prefill and for the mean decode step."""

    device: str
    prompt_len: int
    token_ids: list[int]
    prefill: dict[str, float]
    decode: dict[str, float]
    decode_steps: list[dict[str, float]] = field(repr=False)
    prefill_costs: dict[str, StageCost] = field(repr=False)
    decode_costs: dict[str, StageCost] = field(repr=False)

    @property
    def prefill_wall(self) -> float:
        return sum(self.prefill.values())

    @property
    def decode_wall(self) -> float:
        return sum(self.decode.values())

    def format_table(self) -> str:
        """A text table: time and share per stage for prefill and per decode token, with GFLOP and
        arithmetic intensity (FLOP/byte) of each."""
        header = (f"{'stage':<18} {'prefill ms':>10} {'%':>5} {'GFLOP':>7} {'FLOP/B':>7}   "
                  f"{'decode ms/tok':>13} {'%':>5} {'GFLOP':>7} {'FLOP/B':>7}")
        rows = [f"{self.device}: prompt of {self.prompt_len} tokens, {len(self.decode_steps)} decode steps",
                header, "-" * len(header)]
        for name in (*STAGES, OVERHEAD):
            cells = []
            for times, wall, costs, width in ((self.prefill, self.prefill_wall, self.prefill_costs, 10),
                                              (self.decode, self.decode_wall, self.decode_costs, 13)):
                cost = costs.get(name, StageCost(0, 0, 0))     # the overhead has no FLOPs
                cells.append(f"{times[name] * 1e3:>{width}.3f} {100 * times[name] / wall if wall else 0:>5.1f} "
                             f"{cost.flops / 1e9:>7.3f} {cost.intensity:>7.1f}")
            rows.append(f"{name:<18} {cells[0]}   {cells[1]}")
        rows.append(f"{'total (wall)':<18} {self.prefill_wall * 1e3:>10.3f}{'':>24}   "
                    f"{self.decode_wall * 1e3:>13.3f}   ({1 / self.decode_wall if self.decode_wall else 0:.1f} tok/s)")
        return "\n".join(rows)


def _step_times(timer: StageTimer, start: float) -> dict[str, float]:
    """All stages of a step (0 for those that did not run) and the overhead: wall time minus them."""
    seconds = timer.finish()
    wall = time.perf_counter() - start
    times = {name: seconds.get(name, 0.0) for name in STAGES}
    times[OVERHEAD] = wall - sum(times.values())
    return times


def _mean_times(steps: list[dict[str, float]]) -> dict[str, float]:
    if not steps:
        return {name: 0.0 for name in (*STAGES, OVERHEAD)}
    return {name: sum(step[name] for step in steps) / len(steps) for name in steps[0]}


GRAPHED = ("this model was loaded with compile or cuda_graphs: its decode step runs as fused kernels or one "
           "graph replay, inside which per-stage timers see nothing. Profile the same model loaded without "
           "them (llmlab.load(..., compile='none', cuda_graphs=False) and the same other switches): its "
           "stages are the ones the graph is made of. For the graphed step's own kernels and launches, "
           "use llmlab.launches")


@torch.inference_mode()
def profile_generation(llm, prompt: str | list[int], max_new_tokens: int = 32,
                       params: SamplingParams = SamplingParams(), stop_ids=None,
                       kv_cache: str | None = None) -> Profile:
    """Generate up to max_new_tokens after `prompt` (text, or token ids to skip tokenization) with
    the engine's eager loop, `generate_tokens`, step for step, timing every stage; returns the
    Profile. Its tokens are `llm.generate_ids`'s. kv_cache: the layout (default: the one load() was
    given). A compiled or graphed model is refused (see the module's docstring)."""
    if llm.options.graph_ready:
        raise LlmlabError(GRAPHED)
    model, device = llm.model, llm.device
    kv_cache = llm.options.kv_cache if kv_cache is None else kv_cache
    if stop_ids is None:
        stop_ids = {llm.tokenizer.eos_id} if llm.tokenizer else set()
    stop_ids = set(stop_ids)
    timer, steps, out = StageTimer(device), [], []
    with listening(timer.stage):
        start = time.perf_counter()
        ids = prompt
        if isinstance(prompt, str):
            tokenizer = llm._require_tokenizer()
            with timer.stage("tokenization"):
                ids = tokenizer.encode(prompt)
        ids = llm._check_ids(ids, max_new_tokens)
        with timer.stage("kv_cache"):
            cache = make_cache(kv_cache, model.config, len(ids) + max_new_tokens, llm.dtype, device)
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        with timer.stage("sampling"):       # the sampler's state, as generate_tokens sets it up
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
            seed_row = torch.tensor([int64_seed(seed)], device=device)
            seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
            seen[0, tokens[0]] = True
        logits = prefill(model, tokens, cache)
        for step in range(max_new_tokens):
            pos = len(ids) + step                          # the position of the token drawn now
            with timer.stage("sampling"):
                next_token = sample_on_device(logits, params, seed_row, torch.tensor([pos], device=device), seen)
                token_id = int(next_token)
            out.append(token_id)
            steps.append(_step_times(timer, start))
            if token_id in stop_ids or step == max_new_tokens - 1:
                break
            start = time.perf_counter()
            with timer.stage("sampling"):
                seen[0, token_id] = True
            logits = decode_one_token(model, next_token.view(1, 1), pos, cache)
    costs = model_stage_costs(model, cache)
    return Profile(
        device=str(device), prompt_len=len(ids), token_ids=out,
        prefill=steps[0], decode=_mean_times(steps[1:]), decode_steps=steps[1:],
        prefill_costs=costs(len(ids), len(ids)),
        decode_costs=_mean_costs([costs(1, len(ids) + step) for step in range(1, len(steps))]),
    )


@torch.inference_mode()
def profile_batch(model, batch: int, prompt_len: int, decode_steps: int = 3,
                  generator: torch.Generator | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Stage seconds of one prefill of `batch` random prompts of prompt_len tokens, and of the mean
    decode step after it (every sequence gets one new token per step), through the model's own
    forward. No tokenizer and no sampling: the model's stages alone, to see how their shares move
    with prompt length and batch size."""
    device, config = model.embed.weight.device, model.config
    tokens = torch.randint(0, config.vocab_size, (batch, prompt_len + decode_steps), generator=generator).to(device)
    cache = KVCache(config, prompt_len + decode_steps, batch, dtype=model.embed.weight.dtype, device=device)
    timer, steps = StageTimer(device), []
    with listening(timer.stage):
        for step in range(decode_steps + 1):
            start, end = (0, prompt_len) if step == 0 else (prompt_len + step - 1, prompt_len + step)
            wall = time.perf_counter()
            model(tokens[:, start:end], start_pos=start, cache=cache, last_only=True)
            steps.append(_step_times(timer, wall))
    return steps[0], _mean_times(steps[1:])
