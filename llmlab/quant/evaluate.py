"""How much does quantization cost in quality? A quantized model against the fp32 one on held-out text.

Three numbers, over every predicted position of the text (see `llmlab.eval` for the definitions):

    perplexity       of each model on the text: how well it predicts the real next token
    KL divergence    KL(P_fp32 || P_quantized), nats per position: how far the whole next-token
                     distribution moved, even where the argmax did not
    top-1 agreement  the fraction of positions where both models would pick the same greedy token

The text is read in windows that share one token, as `llmlab.eval.perplexity` does, so the
perplexities here equal that function's.
"""

from __future__ import annotations

import math

import torch

from .. import eval as quality
from ..corpus import HELD_OUT_PLAYS, shakespeare_dir
from ..config import preset
from ..errors import LlmlabError
from ..kv_cache import KV_CACHES, make_cache
from ..llm import LLM, load
from ..options import engine_options
from ..validate import is_int
from .int8_dot import DOT_ROWS

try:
    from tqdm.auto import tqdm
except ImportError:   # tqdm comes with the `lab` extras; without it there is no progress bar
    tqdm = None

# switches a format may add after "+" (their values are text; llmlab.options checks them)
TEXT_SWITCHES = ("head", "sparsity", "kernels")
KL_ROWS = 128   # positions per KL computation: float64 over 49,152 tokens is 50 MB per tensor


def held_out_ids(tokenizer, n_tokens: int = 50_000) -> list[int]:
    """The first n_tokens token ids of the held-out plays."""
    check_n_tokens(n_tokens)
    text = "\n\n".join((shakespeare_dir() / play).read_text(encoding="utf-8", errors="replace")
                       for play in HELD_OUT_PLAYS)
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise LlmlabError(f"the held-out plays give {len(ids):,} tokens, fewer than the {n_tokens:,} asked for")
    return ids[:n_tokens]


def check_n_tokens(n_tokens) -> int:
    # a negative count would slice from the end (ids[:-1] is nearly all of them), 0 or 1 predict nothing
    if not is_int(n_tokens) or n_tokens < 2:
        raise LlmlabError(f"the number of tokens to score must be an integer >= 2 (a context token and a "
                          f"predicted one), got {n_tokens!r}")
    return int(n_tokens)


def cached_logits(llm: LLM, ids: list[int], kv_cache: str) -> torch.Tensor:
    """Logits of every position, computed through a KV cache of the given kind: in chunks of 64 after
    the first, so every chunk's attention reads keys and values back from the cache, as decode does
    (a quantized cache's rounding included). Under kernels="int8-dot", chunks of DOT_ROWS tokens: the
    C kernel serves calls of up to that many tokens only, so larger chunks would score PyTorch's."""
    cache = make_cache(kv_cache, llm.config, len(ids), llm.dtype, llm.device)
    tokens = torch.tensor([ids], device=llm.device)
    size = DOT_ROWS if llm.options.kernels == "int8-dot" else 64
    chunks = [llm.model(tokens[:, start:start + size], start_pos=start, cache=cache)[0]
              for start in range(0, len(ids), size)]
    return torch.cat(chunks).float()


@torch.inference_mode()
def compare_many(reference: LLM, candidates: dict[str, tuple[LLM, str | None]], ids: list[int], *,
                 window: int = 1024, progress: bool = True) -> dict[str, dict]:
    """Perplexity of every candidate (name -> (model, KV cache kind or None)) and its KL and top-1
    agreement against reference, on `ids`. The reference's logits are computed once per window and
    shared by all candidates; with a KV cache kind, a candidate's logits come through that cache."""
    if len(ids) < 2:
        raise LlmlabError(f"compare needs at least 2 tokens, got {len(ids)}")
    quality.check_window(window, reference.config.max_seq_len)
    windows = [ids[start:start + window] for start in range(0, len(ids) - 1, window - 1)]
    if progress and tqdm is not None:
        windows = tqdm(windows, desc="windows", unit="window")
    nll_reference = 0.0
    sums = {name: {"nll": 0.0, "kl": 0.0, "agreeing": 0.0} for name in candidates}
    for chunk in windows:
        ref_logits = reference.logits(chunk)                                            # (len(chunk), vocab)
        nll_reference -= quality.token_log_probs(ref_logits, chunk).double().sum().item()
        for name, (candidate, kv_cache) in candidates.items():
            if kv_cache:
                cand_logits = cached_logits(candidate, chunk, kv_cache)
            else:   # the reference scored against itself (the table's baseline row) costs nothing more
                cand_logits = ref_logits if candidate is reference else candidate.logits(chunk)
            s = sums[name]
            s["nll"] -= quality.token_log_probs(cand_logits, chunk).double().sum().item()
            ref, cand = ref_logits[:-1], cand_logits[:-1]      # the last row predicts past the window
            s["agreeing"] += quality.top1_agreement(ref, cand) * len(ref)
            for row in range(0, len(ref), KL_ROWS):
                rows = slice(row, row + KL_ROWS)
                s["kl"] += quality.kl_divergence(ref[rows], cand[rows]) * len(ref[rows])
    n_predicted = len(ids) - 1
    return {name: {"tokens": len(ids),
                   "perplexity_reference": math.exp(nll_reference / n_predicted),
                   "perplexity": math.exp(s["nll"] / n_predicted),
                   "kl_divergence": s["kl"] / n_predicted,
                   "top1_agreement": s["agreeing"] / n_predicted}
            for name, s in sums.items()}


def compare(reference: LLM, candidate: LLM, ids: list[int], *, window: int = 1024, progress: bool = True,
            kv_cache: str | None = None) -> dict:
    """Perplexity of both models on `ids`, and KL and top-1 agreement of candidate against reference."""
    return compare_many(reference, {"candidate": (candidate, kv_cache)}, ids, window=window,
                        progress=progress)["candidate"]


def model_bytes(llm: LLM) -> int:
    """Bytes of every weight the model holds: parameters and (quantized layers') buffers, shared storage
    (the tied head, the fused projections' views) counted once."""
    storages = {}
    for t in (*llm.model.parameters(), *llm.model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def parse_format(name: str) -> tuple[dict, str | None]:
    """A format name as (load switches, KV cache kind or None):

    "int4-g64" -> ({"weights": "int4", "group_size": 64}, None);  "kv-int8" -> ({"weights": "fp32"}, "kv-int8");
    more switches after "+": "int4-g32+head=int8", "fp32+sparsity=wanda:0.5" (any text-valued switch);
    "int4-g32+kernels=int8-dot" is scored through a static KV cache, DOT_ROWS tokens per forward."""
    first, *extra = name.split("+")
    if first.startswith("kv-"):
        if first not in KV_CACHES:
            kinds = ", ".join(k for k in KV_CACHES if k.startswith("kv-"))
            raise LlmlabError(f"format {name!r}: the KV cache formats are {kinds}")
        switches, kv_cache = {"weights": "fp32"}, first
    else:
        weights, _, group = first.partition("-g")
        if group and not group.isdigit():
            raise LlmlabError(f"format {name!r}: write a group size as int4-g32, int4-g64, ...")
        switches, kv_cache = {"weights": weights, **({"group_size": int(group)} if group else {})}, None
    for part in extra:
        key, equals, value = part.partition("=")
        if not equals or key in switches or key not in TEXT_SWITCHES:
            raise LlmlabError(f"format {name!r}: after '+' write one of {', '.join(TEXT_SWITCHES)} as switch=value, "
                              f"e.g. int4-g32+head=int8 or fp32+sparsity=wanda:0.5")
        switches[key] = value
    if switches.get("kernels") == "int8-dot":   # its kernel runs decode-sized calls: score through a cache
        kv_cache = kv_cache or "static"
    try:    # checked now, not after minutes of loading the reference
        engine_options(**switches)
    except LlmlabError as e:
        raise LlmlabError(f"format {name!r}: {e}") from None
    return switches, kv_cache


def quality_table(formats: list[str], n_tokens: int = 50_000, window: int = 1024, progress: bool = True,
                  device: str = "cpu") -> dict:
    """Each format ("fp32", "bf16", "int8", "int4-g32", "fp8", "kv-int8", ...) against the fp32 model
    on n_tokens of the held-out plays, with the model's weight bytes. Every model is on `device`."""
    parsed = {name: parse_format(name) for name in formats}          # every name checked before any work
    check_n_tokens(n_tokens)
    quality.check_window(window, preset("smollm2-135m").max_seq_len)   # the bundled model's context, before it loads
    from ..bench.report import device_name       # here: the bench package is heavy, and only the report needs it
    reference = load(weights="fp32", device=device)
    ids = held_out_ids(reference.tokenizer, n_tokens)
    candidates = {name: (reference if switches == {"weights": "fp32"} and kv_cache is None
                         else load(**switches, device=device),
                         kv_cache)
                  for name, (switches, kv_cache) in parsed.items()}
    if progress:
        print(f"{', '.join(formats)} against fp32 on {len(ids):,} tokens", flush=True)
    scores = compare_many(reference, candidates, ids, window=window, progress=progress)
    results = {name: {"weights": switches["weights"], "group_size": switches.get("group_size"), "kv_cache": kv_cache,
                      "switches": switches, "model_bytes": model_bytes(candidates[name][0]), **scores[name]}
               for name, (switches, kv_cache) in parsed.items()}
    return {"held_out_plays": list(HELD_OUT_PLAYS), "tokens": len(ids), "window": window,
            "device": device_name(reference.device),
            "reference": "the shipped Q4_1 GGUF dequantized to fp32", "results": results}
