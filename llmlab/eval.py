"""How good are the logits? Perplexity on real text, and agreement between two sets of logits.

Perplexity of a text $x_1 \\dots x_N$ (token ids) under the model:

    $\\mathrm{PPL} = \\exp\\Big(-\\frac{1}{N-1} \\sum_{t=2}^{N} \\log p(x_t \\mid x_{<t})\\Big)$

the exponential of the mean negative log-likelihood (the cross-entropy, in nats) of every token
after the first, which has nothing to be predicted from. A model guessing uniformly over V tokens
has perplexity V; a perfect one, 1.

Comparing a changed model (bf16, quantized, pruned, another kernel) with a reference, position by
position, over logits of shape (..., vocab):

    top-1 agreement   the fraction of positions where both argmaxes are the same token
    KL divergence     $\\mathrm{KL}(P \\,\\|\\, Q) = \\sum_i P_i (\\log P_i - \\log Q_i)$, in nats,
                      P = softmax(reference), Q = softmax(other), averaged over positions
"""

from __future__ import annotations

import math

import torch

from . import validate
from .errors import LlmlabError


def token_log_probs(logits: torch.Tensor, ids) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 2..N: row t-1 of the logits scores token t. Shape (N-1,)."""
    _check_logits(logits)
    ids = torch.as_tensor(validate.token_ids(ids, logits.shape[-1], allow_empty=True), dtype=torch.long,
                          device=logits.device)
    if len(ids) < 2:
        raise LlmlabError(f"perplexity needs a sequence of at least 2 tokens, got {len(ids)}: "
                          f"the first token is only context, each later one is predicted")
    if logits.shape[:-1] != ids.shape:
        raise LlmlabError(f"logits {tuple(logits.shape)} do not match {len(ids)} token ids: "
                          f"expected ({len(ids)}, vocab)")
    log_probs = logits[:-1].float().log_softmax(dim=-1)           # (N-1, vocab)
    return log_probs.gather(-1, ids[1:, None]).squeeze(-1)


def perplexity_from_logits(logits: torch.Tensor, ids) -> float:
    """exp(mean negative log-likelihood) of ids[1:] under logits (N, vocab) of the N ids."""
    return token_log_probs(logits, ids).mean().neg().exp().item()


def perplexity(llm, ids_or_text, *, window: int = 1024) -> float:
    """Perplexity of a text (str, tokenized with the model's tokenizer) or of a list of token ids.

    A text longer than `window` tokens is scored in consecutive windows that share one token: each
    window starts with the last token of the one before as its only context, so every token after
    the first is predicted exactly once, and the logits in memory stay at window x vocab (1024 x
    49152 floats = 200 MB). A text of at most `window` tokens is one forward pass.
    """
    if isinstance(ids_or_text, str):
        ids = llm._require_tokenizer().encode(ids_or_text)
    else:
        ids = validate.token_ids(ids_or_text, llm.config.vocab_size, allow_empty=True)
    if len(ids) < 2:
        raise LlmlabError(f"perplexity needs at least 2 tokens, got {len(ids)}: give a longer text")
    check_window(window, llm.config.max_seq_len)
    total_nll, n_predicted = 0.0, 0
    for start in range(0, len(ids) - 1, window - 1):
        chunk = ids[start:start + window]
        log_probs = token_log_probs(llm.logits(chunk), chunk)
        total_nll -= log_probs.double().sum().item()
        n_predicted += len(log_probs)
    return math.exp(total_nll / n_predicted)


def check_window(window, max_seq_len: int) -> int:
    """Tokens per forward pass: a context token and a predicted one at least, the context at most.
    A window of 0 or 1 would predict nothing, and the average of nothing would read as perplexity 1."""
    if not validate.is_int(window) or not 2 <= window <= max_seq_len:
        raise LlmlabError(f"window must be an integer from 2 (a context token and a predicted one) to the "
                          f"model's context of {max_seq_len} tokens, got {window!r}")
    return int(window)


def _check_logits(logits) -> None:
    # NaN compares false with everything, so a NaN row would silently count as agreeing or as 0 nats
    if not isinstance(logits, torch.Tensor) or logits.dim() == 0 or not logits.is_floating_point():
        raise LlmlabError(f"logits must be a float tensor (..., vocab), got {type(logits).__name__} "
                          f"{getattr(logits, 'dtype', '')}")
    if logits.isnan().any():
        raise LlmlabError(f"the logits hold NaN at {logits.isnan().nonzero()[0].tolist()}: the model that made "
                          f"them is broken (NaN weights, or an overflow in fp16)")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_logits(a)
    _check_logits(b)
    if a.shape != b.shape:
        raise LlmlabError(f"compare logits of the same shape (..., vocab); got {tuple(a.shape)} and {tuple(b.shape)}")


def top1_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Fraction of positions where the most likely token is the same (ties: lowest id, in both)."""
    _check_same_shape(reference, other)
    return (reference.argmax(dim=-1) == other.argmax(dim=-1)).float().mean().item()


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(P || Q) in nats, P = softmax(reference), Q = softmax(other).

    Computed in float64 so that a bf16-sized difference is not lost in float32 rounding. Terms with
    P_i = 0 contribute 0 (the limit of p log p), even where Q_i = 0 too.
    """
    _check_same_shape(reference, other)
    log_p = reference.double().log_softmax(dim=-1)
    log_q = other.double().log_softmax(dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1).mean().item()
