"""Where the time goes: per-stage timers for one real generation, and FLOP and byte counts per stage.

`profile_generation` runs a prefill and a decode loop that call the model's own modules one stage at a
time (the same operations, in the same order, as `Transformer.forward`, so the logits are identical)
with a timer around each stage:

    tokenization   text -> ids (prefill only)
    embedding      ids -> rows of the embedding table
    norms          every RMSNorm: two per layer and the final one
    qkv_projections  x W_q^T, x W_k^T, x W_v^T
    rope           the cos/sin tables and their rotation of q and k
    kv_cache       allocating the cache (prefill) and writing the new keys and values into it
    attention_core scores, softmax and the weighted sum of values (the attention backend)
    output_projection  W_o
    mlp            SwiGLU: W_down (silu(W_gate x) * W_up x)
    residual       the two residual additions per layer
    lm_head        final hidden state -> logits, last position only
    sampling       logits -> next token id
    python_overhead  the step's wall time minus all the stages above: the interpreter, the loop,
                   and on a GPU the time the GPU waits for kernels to be launched

The model itself is never touched (no hooks, no flags), so with profiling off nothing changes and
nothing is slower. On CUDA each stage is timed with a pair of CUDA events (GPU time) and the step is
synchronised once, at its end; on CPU with time.perf_counter. Profiling on has a cost of its own, about
13 timers per layer per step: measured decode speed was 3-4 % lower on a 2-core CPU (SmolLM2 fp32) and
~35 % lower on an H100, where this small model is bound by kernel launches and the event records add
to them; the stage shares are still meaningful, the absolute tok/s of a profiled run is not.

`stage_costs` counts FLOPs and bytes per stage from the config, so each stage gets an arithmetic
intensity (FLOPs per byte moved), the x axis of a roofline plot.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .attention import ATTENTION
from .config import ModelConfig
from .kv_cache import KVCache, make_cache
from .model import apply_rope, rope_cos_sin
from .sampling import SamplingParams, make_generator, sample

STAGES = ("tokenization", "embedding", "norms", "qkv_projections", "rope", "kv_cache", "attention_core",
          "output_projection", "mlp", "residual", "lm_head", "sampling")
OVERHEAD = "python_overhead"


class StageTimer:
    """Adds up the time of each stage over one step: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def stage(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - start

    def finish(self) -> dict[str, float]:
        """Stage -> seconds for the step; on CUDA this is the one synchronisation of the step."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.seconds[name] += start.elapsed_time(end) / 1e3     # elapsed_time is in ms
        return dict(self.seconds)


def profiled_attention(attention, x, cos, sin, layer: int, start_pos: int, cache, timer: StageTimer):
    """`Attention.forward`, line for line, with each stage timed."""
    batch, seq, _ = x.shape
    with timer.stage("qkv_projections"):
        q, k, v = attention.project_qkv(x)
    with timer.stage("rope"):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    with timer.stage("kv_cache"):
        k, v = cache.update(layer, start_pos, k, v)
    with timer.stage("attention_core"):
        out = ATTENTION[attention.backend](q, k, v)                      # (batch, heads, seq, head_dim)
    with timer.stage("output_projection"):
        return attention.wo(out.transpose(1, 2).reshape(batch, seq, -1))


def profiled_block(block, x, cos, sin, layer: int, start_pos: int, cache, timer: StageTimer):
    """`Block.forward` with each stage timed."""
    with timer.stage("norms"):
        normed = block.attn_norm(x)
    attended = profiled_attention(block.attention, normed, cos, sin, layer, start_pos, cache, timer)
    with timer.stage("residual"):
        h = x + attended
    with timer.stage("norms"):
        normed = block.mlp_norm(h)
    with timer.stage("mlp"):
        mixed = block.mlp(normed)
    with timer.stage("residual"):
        return h + mixed


@torch.inference_mode()
def profiled_forward(model, tokens: torch.Tensor, start_pos: int, cache, timer: StageTimer) -> torch.Tensor:
    """`Transformer.forward(tokens, start_pos, cache, last_only=True)` with each stage timed:
    logits (batch, 1, vocab) of the last position."""
    with timer.stage("embedding"):
        x = model.embed(tokens)                                          # (batch, seq, dim)
    with timer.stage("rope"):
        positions = torch.arange(start_pos, start_pos + tokens.shape[1], device=tokens.device)
        cos, sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta, x.dtype)
    for i, block in enumerate(model.layers):
        x = profiled_block(block, x, cos, sin, i, start_pos, cache, timer)
    with timer.stage("norms"):
        x = model.norm(x)
    with timer.stage("lm_head"):
        return model.head(x[:, -1:])


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


def stage_costs(config: ModelConfig, n_new: int, context: int, itemsize: int = 4) -> dict[str, StageCost]:
    """FLOPs and bytes of each stage for one forward step: n_new tokens whose last one sits at
    position context - 1 (prefill of n tokens: n_new = context = n; one decode step: n_new = 1).

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
    - the KV cache holds values of `itemsize` bytes; sampling reads fp32 logits (greedy argmax).
    """
    d, layers, vocab, hd = config.dim, config.n_layers, config.vocab_size, config.head_dim
    q_dim, kv_dim, ffn = config.n_heads * hd, config.n_kv_heads * hd, config.ffn_dim
    n, s = n_new, itemsize

    def per_layer(flops, weights, activations):
        return StageCost(layers * flops, layers * weights * s, layers * activations * s)

    n_norms = 2 * layers + 1
    return {
        "tokenization": StageCost(0, 0, 0),
        "embedding": StageCost(0, n * d * s, n * d * s),
        "norms": StageCost(n_norms * 4 * n * d, n_norms * d * s, n_norms * 2 * n * d * s),
        "qkv_projections": per_layer(2 * n * d * (q_dim + 2 * kv_dim), d * (q_dim + 2 * kv_dim),
                                     n * d + n * (q_dim + 2 * kv_dim)),
        "rope": per_layer(3 * n * (q_dim + kv_dim), 0, 2 * n * (q_dim + kv_dim) + 2 * n * hd),
        "kv_cache": per_layer(0, 0, 2 * n * kv_dim),
        "attention_core": per_layer(4 * n * context * q_dim, 0, 2 * n * q_dim + 2 * context * kv_dim),
        "output_projection": per_layer(2 * n * q_dim * d, q_dim * d, n * q_dim + n * d),
        "mlp": per_layer(6 * n * d * ffn, 3 * d * ffn, 2 * n * d + 3 * n * ffn),
        "residual": per_layer(2 * n * d, 0, 6 * n * d),
        "lm_head": StageCost(2 * d * vocab, d * vocab * s, d * s + vocab * s),
        "sampling": StageCost(vocab, 0, vocab * 4),
    }


def _mean_costs(steps: list[dict[str, StageCost]]) -> dict[str, StageCost]:
    return {name: StageCost(*(sum(getattr(step[name], f) for step in steps) / max(len(steps), 1)
                              for f in ("flops", "weight_bytes", "activation_bytes")))
            for name in STAGES}


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


@torch.inference_mode()
def profile_generation(llm, prompt: str | list[int], max_new_tokens: int = 32,
                       params: SamplingParams = SamplingParams(), stop_ids=None,
                       kv_cache: str = "static") -> Profile:
    """Generate up to max_new_tokens after `prompt` (text, or token ids to skip tokenization) as
    `llm.generate_ids` does, timing every stage; returns the Profile."""
    model, device = llm.model, llm.device
    if stop_ids is None:
        stop_ids = {llm.tokenizer.eos_id} if llm.tokenizer else set()
    timer, start = StageTimer(device), time.perf_counter()
    with timer.stage("tokenization"):
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    with timer.stage("kv_cache"):
        cache = make_cache(kv_cache, model.config, len(ids) + max_new_tokens, llm.dtype, device)
    generator, seen, out = make_generator(params.seed, device), tokens[0], []
    step_start, step_timer, steps = start, timer, []
    while True:
        logits = profiled_forward(model, tokens, len(seen) - tokens.shape[1], cache, step_timer)[0, -1]
        with step_timer.stage("sampling"):
            next_token = sample(logits, params, previous_ids=seen, generator=generator)
            out.append(int(next_token))
        steps.append(_step_times(step_timer, step_start))
        if out[-1] in stop_ids or len(out) == max_new_tokens:
            break
        step_timer, step_start = StageTimer(device), time.perf_counter()
        seen, tokens = torch.cat([seen, next_token.view(1)]), next_token.view(1, 1)
    itemsize = llm.dtype.itemsize
    return Profile(
        device=str(device), prompt_len=len(ids), token_ids=out,
        prefill=steps[0], decode=_mean_times(steps[1:]), decode_steps=steps[1:],
        prefill_costs=stage_costs(model.config, len(ids), len(ids), itemsize),
        decode_costs=_mean_costs([stage_costs(model.config, 1, len(ids) + step, itemsize)
                                  for step in range(1, len(steps))]),
    )


@torch.inference_mode()
def profile_batch(model, batch: int, prompt_len: int, decode_steps: int = 3,
                  generator: torch.Generator | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Stage seconds of one prefill of `batch` random prompts of prompt_len tokens, and of the mean
    decode step after it (every sequence gets one new token per step). No tokenizer and no sampling:
    the model's stages alone, to see how their shares move with prompt length and batch size."""
    device, config = model.embed.weight.device, model.config
    tokens = torch.randint(0, config.vocab_size, (batch, prompt_len + decode_steps), generator=generator).to(device)
    cache = KVCache(config, prompt_len + decode_steps, batch, dtype=model.embed.weight.dtype, device=device)
    steps = []
    for step in range(decode_steps + 1):
        start, end = (0, prompt_len) if step == 0 else (prompt_len + step - 1, prompt_len + step)
        timer, wall = StageTimer(device), time.perf_counter()
        profiled_forward(model, tokens[:, start:end], start, cache, timer)
        steps.append(_step_times(timer, wall))
    return steps[0], _mean_times(steps[1:])
