"""The generation loop: one prefill over the prompt, then one decode step per new token.

prefill        runs the whole prompt through the model at once, filling the KV cache, and returns
               the logits of the last position (compute bound: big matmuls).
decode_one_token  runs a single token, reading every earlier key/value from the cache (memory
               bound: every weight is read from memory to produce one token).

`use_cache=False` is the plain path the cache is tested against: every step recomputes the whole
sequence from scratch, which must give the same tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

import torch

from .kv_cache import KVCache, make_cache
from .model import Transformer
from .sampling import SamplingParams, int64_seed, sample_on_device
from .step import Decoder


@torch.inference_mode()
def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens (batch, prompt_len) -> logits of the last position (batch, vocab)."""
    return model(tokens, start_pos=0, cache=cache, last_only=True)[:, -1]


@torch.inference_mode()
def decode_one_token(model: Transformer, token: torch.Tensor, pos: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token (batch, 1) at position pos (an int, or a (batch,) tensor: see llmlab.kv_cache) -> logits (batch, vocab)."""
    return model(token, start_pos=pos, cache=cache, last_only=True)[:, -1]


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
                    params: SamplingParams = SamplingParams(), stop_ids: Iterable[int] = (),
                    use_cache: bool = True, kv_cache: str = "static", decoder: Decoder | None = None) -> Iterator[int]:
    """Yield new token ids one at a time, stopping after a stop id or max_new_tokens.

    The eager reference: kv_cache picks the cache layout (see llmlab.kv_cache.make_cache);
    use_cache=False recomputes the whole sequence at every step instead. With a `decoder`
    (llmlab.step), the fixed-shape step runs instead, compiled and/or captured as its options say.
    Every path draws with the same counter-based sampler, so a seed gives the same text on each.
    """
    stop_ids = set(stop_ids)
    seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))   # torch.manual_seed decides
    if decoder is not None:
        yield from _fixed_shape_tokens(decoder, prompt_ids, max_new_tokens, stop_ids, seed)
        return
    device = model.embed.weight.device
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)   # (1, seq), grows if no cache
    seed_row = torch.tensor([int64_seed(seed)], device=device)
    seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
    seen[0, tokens[0]] = True
    if use_cache:
        cache = make_cache(kv_cache, model.config, len(prompt_ids) + max_new_tokens, model.embed.weight.dtype, device)
        logits = prefill(model, tokens, cache)
    else:
        logits = model(tokens, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        pos = len(prompt_ids) + step                       # the position of the token drawn now
        next_token = sample_on_device(logits, params, seed_row, torch.tensor([pos], device=device), seen)
        token_id = int(next_token)
        yield token_id
        if token_id in stop_ids or step == max_new_tokens - 1:
            return
        seen[0, token_id] = True
        if use_cache:
            logits = decode_one_token(model, next_token.view(1, 1), pos, cache)
        else:
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
            logits = model(tokens, last_only=True)[:, -1]


def _fixed_shape_tokens(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
                        seed: int) -> Iterator[int]:
    """The host's side of the fixed-shape loop: it reads the tokens once per steps_per_graph steps
    (one sync), yields them, and stops at a stop id; the steps run after it are thrown away."""
    device = decoder.token.device
    pending = decoder.start(torch.tensor([prompt_ids], dtype=torch.long, device=device), seed).tolist()
    produced = 0
    while True:
        for token_id in pending:
            yield token_id
            produced += 1
            if token_id in stop_ids or produced == max_new_tokens:
                return
        pending = decoder.next_tokens()[0].tolist()


def stream_text(token_bytes, token_ids: Iterable[int], skip_ids: Iterable[int] = ()) -> Iterator[str]:
    """Turn token ids into text pieces as they arrive.

    One character can span several tokens (an emoji is 4 UTF-8 bytes, often 2+ tokens), so bytes are
    fed to an incremental UTF-8 decoder that holds back an unfinished character until it completes.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    skip_ids = set(skip_ids)
    for token_id in token_ids:
        if token_id in skip_ids:
            continue
        text = decoder.decode(token_bytes(token_id))
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
