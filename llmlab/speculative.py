"""Speculative decoding: a cheap draft guesses K tokens, the model checks all K in one forward pass.

A decode step is memory bound: it reads every weight to produce one token, so a forward pass over
K+1 tokens costs little more than over one. Each guess the model agrees with is a token for free.

One round, with the text so far x_1..x_n (x_n not in the model's cache yet):

1. the draft proposes d_1..d_K, with q_i the distribution d_i was drawn from;
2. the model runs [x_n, d_1..d_K] from position n-1 in one pass: K+1 rows of logits, row i giving
   p_i, the model's distribution for the token after d_i (row 0: after x_n);
3. left to right, d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the first one refused
   is replaced by a draw from norm(max(0, p_i - q_i)), and when all K are accepted a bonus token is
   drawn from p_K. Every round emits the accepted guesses plus that one token.

Each emitted token is then distributed exactly as the model's own p, whatever the draft (Leviathan et
al. 2023, Chen et al. 2023): a good draft only makes it faster. Greedy decoding is the same rule with
p and q one-hot on their argmax: a guess is kept when it is the model's argmax, and the argmax
replaces the first that is not, so the tokens are plain greedy decoding's.

Rolling back needs no work: a refused guess's keys and values stay in the cache, and the next round
writes over them from a smaller start_pos (the eager int path of llmlab.kv_cache returns positions
0..start_pos+new-1 only, so they are never read).

Two drafts:
prompt_lookup  copies what followed the last n-gram earlier in the text (n = 3, 2, 1): no second
               model; it guesses well where the output repeats the input (quotes, code edits, lists)
DraftModel     a smaller model with the same vocabulary, with its own KV cache rolled back alike
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import LlmlabError
from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams, sampling_probs


@dataclass
class SpeculativeStats:
    """Counts over one generation: how well the draft guessed, and what that bought."""

    proposed: int = 0        # guesses the model checked
    accepted: int = 0
    forwards: int = 0        # the model's verification passes (the prefill not counted)
    emitted: int = 0         # tokens those passes produced, stop and max_new_tokens cut-offs included

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.forwards if self.forwards else 0.0


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(rows, vocab) logits -> the distributions the plain sampler draws from: sampling_probs, or a
    one-hot on the argmax when greedy (sample_on_device's argmax: the lowest id among equal maxima)."""
    logits = logits.float()
    if params.is_greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return sampling_probs(logits, params)


def accept(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule, row by row. p, q (rows, vocab): the model's and the draft's distributions;
    draft_tokens (rows,) drawn from q. Returns (tokens, accepted), both (rows,): the draft token where
    accepted (probability min(1, p(x) / q(x))), else a draw from norm(max(0, p - q))."""
    rows = torch.arange(len(draft_tokens), device=p.device)
    p_x, q_x = p[rows, draft_tokens], q[rows, draft_tokens]
    u = torch.rand(len(draft_tokens), generator=generator, device=p.device)
    accepted = u * q_x < p_x                          # u < p(x)/q(x) without dividing; never when p(x) = 0
    residual = (p - q).clamp(min=0)
    # a refusal needs q(x) > p(x), so the residual has mass; only rounding could empty a row
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
    replacement = torch.multinomial(residual, 1, generator=generator).squeeze(-1)   # normalises itself
    return torch.where(accepted, draft_tokens, replacement), accepted


def verify(p: torch.Tensor, q: torch.Tensor | None, guesses: list[int],
           generator: torch.Generator | None) -> tuple[list[int], int]:
    """One round's tokens and how many guesses were accepted. p (K+1, vocab): the model's rows; q (K,
    vocab): the draft's. All K are judged at once; the draws for guesses after the first refusal are
    independent of it and thrown away, which leaves the left-to-right rule unchanged."""
    k = len(guesses)
    if k == 0:
        return [int(torch.multinomial(p[0], 1, generator=generator))], 0
    tokens, accepted = accept(p[:k], q, torch.tensor(guesses, device=p.device), generator)
    n_accepted = int(accepted.long().cumprod(dim=0).sum())           # the leading run of True
    if n_accepted < k:
        return guesses[:n_accepted] + [int(tokens[n_accepted])], n_accepted
    return guesses + [int(torch.multinomial(p[k], 1, generator=generator))], k


def prompt_lookup(ids: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to k guesses by copying: find the latest earlier place where the text's last n tokens occur
    (n = max_ngram down to 1) and propose what followed. The copy may run on into its own guesses, so a
    text repeating every two tokens still gets k of them. [] when no n-gram occurred before."""
    for n in range(min(max_ngram, len(ids) - 1), 0, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                text = list(ids)
                for i in range(k):
                    text.append(text[start + n + i])
                return text[len(ids):]
    return []


class DraftModel:
    """A draft model with its own KV cache. It remembers which tokens its cache holds, and each round
    feeds only the ones after the longest prefix still valid: rolling back is writing over the rest."""

    def __init__(self, model: Transformer, vocab_size: int, max_seq_len: int):
        if model.config.vocab_size != vocab_size:
            raise LlmlabError(f"the draft model has a vocabulary of {model.config.vocab_size}, the model "
                              f"{vocab_size}: a draft must share the model's tokens")
        if max_seq_len > model.config.max_seq_len:
            raise LlmlabError(f"the draft model's context is {model.config.max_seq_len} tokens; this generation "
                              f"needs {max_seq_len}")
        self.model = model
        self.cache = KVCache(model.config, max_seq_len, dtype=model.embed.weight.dtype, device=model.embed.weight.device)
        self.cached: list[int] = []

    def propose(self, ids: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
        """k guesses after ids, each drawn from the draft's q with the model's sampling settings;
        returns them and q (k, vocab)."""
        start = 0
        while start < min(len(self.cached), len(ids) - 1) and self.cached[start] == ids[start]:
            start += 1                                 # at least the last token is fed: its logits are needed
        tokens = torch.tensor([ids[start:]], device=self.model.embed.weight.device)
        guesses, qs = [], []
        for _ in range(k):
            logits = self.model(tokens, start_pos=start, cache=self.cache, last_only=True)[:, -1]
            start += tokens.shape[1]
            q = token_probs(logits, params)[0]
            tokens = torch.multinomial(q, 1, generator=generator).view(1, 1)   # one-hot q: the argmax
            guesses.append(int(tokens))
            qs.append(q)
        self.cached = ids + guesses[:-1]                # the last guess was never fed
        return guesses, torch.stack(qs)


def speculative_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int, k: int,
                       params: SamplingParams = SamplingParams(), stop_ids: Iterable[int] = (),
                       draft: Transformer | None = None, stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Yield new token ids as generate_tokens does (stopping after a stop id or max_new_tokens), K
    guesses per round from `draft`, or from prompt_lookup when draft is None. `stats` is filled in."""
    if params.repetition_penalty != 1.0:
        raise LlmlabError("speculative decoding does not apply a repetition penalty: the penalty depends on "
                          "the guesses before each token; use repetition_penalty=1 or speculative='none'")
    seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))   # torch.manual_seed decides
    device = model.embed.weight.device
    total = len(prompt_ids) + max_new_tokens
    drafter = DraftModel(draft, model.config.vocab_size, total) if draft is not None else None
    return _rounds(model, list(prompt_ids), max_new_tokens, k, params, set(stop_ids), drafter,
                   torch.Generator(device=device).manual_seed(seed), stats if stats is not None else SpeculativeStats())


@torch.inference_mode()
def _rounds(model: Transformer, ids: list[int], max_new_tokens: int, k: int, params: SamplingParams,
            stop_ids: set[int], drafter: DraftModel | None, generator: torch.Generator,
            stats: SpeculativeStats) -> Iterator[int]:
    device = model.embed.weight.device
    n_prompt = len(ids)
    cache = KVCache(model.config, n_prompt + max_new_tokens, dtype=model.embed.weight.dtype, device=device)
    if n_prompt > 1:           # all but the last token: every round starts by feeding the last one
        model(torch.tensor([ids[:-1]], device=device), start_pos=0, cache=cache, last_only=True)
    while True:
        # at most the tokens still wanted, so the cache (and the draft's) never runs past its end
        k_now = min(k, max_new_tokens - (len(ids) - n_prompt) - 1)
        q = None
        if drafter is not None and k_now > 0:
            guesses, q = drafter.propose(ids, k_now, params, generator)
        else:
            guesses = prompt_lookup(ids, k_now) if k_now > 0 else []
            if guesses:
                q = F.one_hot(torch.tensor(guesses, device=device), model.config.vocab_size).float()
        logits = model(torch.tensor([ids[-1:] + guesses], device=device), start_pos=len(ids) - 1, cache=cache)
        emitted, n_accepted = verify(token_probs(logits[0], params), q, guesses, generator)
        stats.proposed, stats.accepted = stats.proposed + len(guesses), stats.accepted + n_accepted
        stats.forwards += 1
        for token_id in emitted:
            stats.emitted += 1
            yield token_id
            ids.append(token_id)
            if token_id in stop_ids or len(ids) - n_prompt == max_new_tokens:
                return
