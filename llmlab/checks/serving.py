"""Checks for the exercises of notebooks/13_serving.ipynb.

Expected answers are worked out here from the definitions (a static batch runs until its longest
request is done; a prefix-cache hit is a chain of whole blocks; speculative sampling's output must be
distributed as the model's p), never from a stored number. The block count is also asked of the
engine's own BlockManager, and the two must agree before an answer is judged.
"""

from __future__ import annotations

import math
import random

import torch

from llmlab.serve.blocks import BlockManager

from . import check, unanswered

# --- static batching: the padding ----------------------------------------------------------------


def _static_slots(lengths: list[int], batch_size: int) -> int:
    """Decode slots a static server spends: each batch of `batch_size` requests (in arrival order, the
    last one smaller) runs as many steps as its longest request, every row every step."""
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(len(b) * max(b) for b in batches)


def padding_waste_of(lengths: list[int], batch_size: int) -> float:
    """The fraction of a static server's decode slots that hold padding, not a request's token."""
    return 1 - sum(lengths) / _static_slots(lengths, batch_size)


@check
def check_padding_waste(padding_waste, lengths: list[int] | None = None) -> None:
    """`padding_waste(output_lengths, batch_size)`: the fraction of decode slots wasted on padding when
    the requests are served in static batches of batch_size, in arrival order. `lengths`: the
    notebook's own requests, checked first."""
    if unanswered(padding_waste([3, 1], 2), "padding_waste"):
        return
    rng = random.Random(13)
    cases = ([(list(lengths), 4), (list(lengths), 3)] if lengths else []) + [
        ([5, 5, 5, 5], 2),                                # nothing to pad
        ([1, 8], 2),
        ([2, 9, 4, 4, 7], 2),                             # a last batch of one
        ([rng.randint(1, 64) for _ in range(23)], 4),
        ([rng.randint(1, 300) for _ in range(50)], 8),
        ([6, 2, 3], 8),                                   # fewer requests than a batch
    ]
    for lens, size in cases:
        got, want = padding_waste(list(lens), size), padding_waste_of(lens, size)
        where = f"lengths {lens if len(lens) <= 8 else str(lens[:8])[:-1] + ', ...]'}, batch_size {size}"
        assert isinstance(got, (int, float)) or (torch.is_tensor(got) and got.numel() == 1), (
            f"{where}: return one number, the wasted fraction, got {type(got).__name__}")
        got = float(got)
        if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            continue
        padded = _static_slots(lens, size) - sum(lens)
        if math.isclose(got, padded):
            raise AssertionError(f"{where}: {got:g} is the number of padded slots; return the fraction of all "
                                 f"slots it is: padded / slots")
        if math.isclose(got, 1 - want):
            raise AssertionError(f"{where}: {got:.4f} is the useful fraction, the tokens asked for over the slots; "
                                 f"the waste is 1 minus that")
        if math.isclose(got, 1 - sum(lens) / (len(lens) * max(lens))):
            raise AssertionError(f"{where}: you padded every request to the longest of them all; a static batch "
                                 f"waits only for the longest of its own batch, then the next batch starts")
        full_rows = sum(size * max(lens[i:i + size]) for i in range(0, len(lens), size))
        if math.isclose(got, 1 - sum(lens) / full_rows):
            raise AssertionError(f"{where}: you counted batch_size rows in every batch; the last batch holds only "
                                 f"the requests left ({len(lens) % size or size} here), and there are no empty rows")
        if math.isclose(got, padding_waste_of(sorted(lens), size)):
            raise AssertionError(f"{where}: you sorted the requests by length first; a server cannot: it does not "
                                 f"know how long an answer will be until it ends. Batch them in arrival order")
        raise AssertionError(f"{where}: expected {want:.4f}, got {got:.4f}. Batch in arrival order, batch_size at "
                             f"a time; a batch of b requests whose longest asks for L tokens spends b x L slots")
    print(f"Correct: the same waste as the definition in all {len(cases)} cases"
          + (f"; the notebook's requests in static batches of 4 waste {padding_waste_of(lengths, 4):.0%} of the "
             f"decode slots." if lengths else "."))


# --- the prefix cache: blocks for a new prompt ------------------------------------------------------


def _hit_blocks(prompt: list[int], computed: list[list[int]], block_size: int) -> int:
    """Leading whole blocks of prompt whose KV some earlier sequence computed: for each, the blocks up to
    the first that differs (a block's key is its tokens *and* everything before it), at most that
    sequence's full blocks; and never the prompt's last token, whose logits must be computed."""
    best = 0
    for tokens in computed:
        n = 0
        while (n + 1) * block_size <= min(len(tokens), len(prompt)) and \
                tokens[n * block_size:(n + 1) * block_size] == prompt[n * block_size:(n + 1) * block_size]:
            n += 1
        best = max(best, n)
    return min(best, (len(prompt) - 1) // block_size)


def blocks_for_prompt(prompt: list[int], computed: list[list[int]], block_size: int) -> tuple[int, int]:
    """(prompt tokens the prefix cache holds, new blocks the prompt needs)."""
    hits = _hit_blocks(prompt, computed, block_size)
    return hits * block_size, -(-len(prompt) // block_size) - hits


def _engine_blocks(prompt: list[int], computed: list[list[int]], block_size: int) -> tuple[int, int]:
    """The same question asked of llmlab's BlockManager: run each earlier sequence (allocate, write its
    KV, finish), then admit the prompt."""
    manager = BlockManager(n_blocks=sum(-(-len(t) // block_size) for t in [*computed, prompt]) + 1,
                           block_size=block_size)
    for i, tokens in enumerate(computed):
        manager.allocate(("earlier", i), tokens)
        manager.mark_computed(("earlier", i), tokens)
        manager.free(("earlier", i))
    hit = manager.allocate("new", prompt)
    return hit, len(manager.block_table("new")) - hit // block_size


def _chained_blindly(prompt, computed, block_size) -> int:
    """The usual wrong walk: block i counted if it equals block i of some earlier sequence, whatever
    came before it."""
    n_full = (len(prompt) - 1) // block_size
    return sum(any(t[i * block_size:(i + 1) * block_size] == prompt[i * block_size:(i + 1) * block_size]
                   for t in computed) for i in range(n_full))


def _cases(block_size: int, text: list[int]) -> list[tuple[str, list[int], list[list[int]]]]:
    bs = block_size
    system, q1, q2 = text[:3 * bs + 5], text[200:200 + 8], text[300:300 + 2 * bs]
    swapped = text[500:500 + bs] + system[bs:]                  # block 0 differs, blocks 1.. the same tokens
    return [
        ("a prompt nothing was computed for", system + q1, []),
        ("a shared opening of 3 blocks and 5 tokens, then another question", system + q2, [system + q1]),
        ("the same prompt again, a whole number of blocks long", system[:3 * bs], [system[:3 * bs]]),
        ("the same prompt again, 13 tokens past a block boundary", system + q1, [system + q1]),
        ("a prompt whose first block differs", swapped + q1, [system + q1]),
        ("a prompt shorter than the computed sequence", system[:2 * bs + 3], [system + q2]),
        ("two earlier sequences, the longer match wins", system + q1 + q2,
         [system[:bs] + q2, system + q1 + text[700:700 + 3]]),
        ("a prompt of one token", text[900:901], [text[900:950]]),
    ]


@check
def check_prompt_blocks(blocks_for, block_size: int = 16, text: list[int] | None = None) -> None:
    """`blocks_for(prompt, computed, block_size)` -> (hit_tokens, new_blocks): for a new prompt, how many of
    its tokens the prefix cache already holds, given the earlier sequences whose KV was computed
    (every full block of each is cached), and how many new blocks it must be given. `text`: token ids
    the cases are cut from (the notebook passes real ones); at least 1,000 of them."""
    text = text if text is not None else [(7 * i * i + 3 * i) % 4999 + 1 for i in range(1000)]
    if unanswered(blocks_for(text[:5], [], block_size), "blocks_for"):
        return
    if len(text) < 1000 or len(set(text[:1000])) < 200:
        raise ValueError("check_prompt_blocks needs at least 1,000 tokens of varied text to cut its cases from")
    bs = block_size
    for what, prompt, computed in _cases(bs, text):
        want = blocks_for_prompt(prompt, computed, bs)
        engine = _engine_blocks(prompt, computed, bs)
        if engine != want:
            raise RuntimeError(f"{what}: the check's own answer {want} and llmlab's BlockManager's {engine} "
                               f"disagree; this is a bug in the check or the engine, not in your answer")
        got = blocks_for(list(prompt), [list(t) for t in computed], bs)
        where = f"{what} ({len(prompt)} tokens, block size {bs})"
        assert isinstance(got, tuple) and len(got) == 2, (
            f"{where}: return two numbers, (hit_tokens, new_blocks); got {got!r}")
        hit, new = (int(v) for v in got)
        if (hit, new) == want:
            continue
        n_blocks = -(-len(prompt) // bs)
        if hit == want[0] // bs and want[0]:
            raise AssertionError(f"{where}: hit_tokens counts tokens, not blocks: {want[0] // bs} blocks of {bs} "
                                 f"are {want[0]} tokens")
        if hit % bs:
            raise AssertionError(f"{where}: hit_tokens = {hit} is not a whole number of blocks; only full blocks are "
                                 f"keyed in the prefix cache, so a hit ends at a block boundary")
        if hit == _chained_blindly(prompt, computed, bs) * bs != want[0]:
            raise AssertionError(f"{where}: you counted block i as a hit because its tokens equal block i of an "
                                 f"earlier sequence; but a block's keys and values depend on every token before it, so "
                                 f"its key is its tokens *and* its parent's key: the hits stop at the first block that "
                                 f"differs")
        if len(prompt) % bs == 0 and hit == want[0] + bs:
            raise AssertionError(f"{where}: you counted the last block as a hit; at least the prompt's last token must "
                                 f"run, since its logits pick the first new token, so a prompt of exactly k cached "
                                 f"blocks hits k - 1 of them and computes the last block into a new one")
        if hit != want[0]:
            raise AssertionError(f"{where}: expected {want[0]} hit tokens, got {hit}. Walk the prompt's full blocks "
                                 f"from the first, as long as some earlier sequence has the same tokens up to the end "
                                 f"of that block")
        if new == len(prompt) // bs - hit // bs:
            raise AssertionError(f"{where}: you rounded the block count down; the prompt's last, partly filled block "
                                 f"needs a block too: ceil({len(prompt)} / {bs}) = {n_blocks} blocks in all")
        if new == n_blocks:
            raise AssertionError(f"{where}: {new} is every block of the prompt; the {hit // bs} blocks that hit are "
                                 f"shared, not new: new = ceil(n / block_size) - hit blocks")
        raise AssertionError(f"{where}: expected {want[1]} new blocks, got {new}: ceil(n / block_size) minus the "
                             f"blocks that hit")
    print(f"Correct: the same hits and new blocks as llmlab's BlockManager in all {len(_cases(bs, text))} cases.")


# --- speculative sampling: the acceptance rule -----------------------------------------------------


def _distributions(vocab: int, n: int, generator: torch.Generator) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, p, q): random pairs of several sharpnesses, and two greedy ones (one-hot p and q)."""
    pairs = []
    for i in range(n):
        p = torch.softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * (1 + i % 3), 0)
        q = torch.softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * (1 + i % 2), 0)
        pairs.append((f"random pair {i}", p, q))
    one_hot = torch.eye(vocab, dtype=torch.float64)
    pairs += [("a greedy pair, the same argmax", one_hot[2], one_hot[2]),
              ("a greedy pair, different argmaxes", one_hot[2], one_hot[5])]
    return pairs


def _as_float(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


@check
def check_acceptance_rule(accept_probability, residual_distribution, real: tuple | None = None) -> None:
    """`accept_probability(p, q, x)`: the probability of keeping a draft token x drawn from q, where p is
    the model's distribution; `residual_distribution(p, q)`: the distribution a refused token is
    replaced by. p, q: (vocab,) float64 tensors summing to 1. `real`: (p, q) of the real model and a
    draft at one position, checked too."""
    p0 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q0 = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    if unanswered(accept_probability(p0, q0, 2), "accept_probability") | \
            unanswered(residual_distribution(p0, q0), "residual_distribution"):
        return
    pairs = _distributions(12, 6, torch.Generator().manual_seed(13))
    if real is not None:
        real = tuple(t.detach().double().cpu().flatten() for t in real)
        real = tuple(t / t.sum() for t in real)                  # float32 softmaxes sum to 1 only within 1e-7
        pairs.append(("the real model and its draft", *real))
    for where, p, q in pairs:
        drawable = torch.nonzero(q > 0).flatten().tolist()       # x is drawn from q: q(x) > 0
        if len(drawable) > 64:                                   # the real vocabulary: q's likeliest tokens
            drawable = q.topk(64).indices.tolist()
        want = torch.where(q > 0, torch.clamp(p / q, max=1), torch.zeros_like(p))
        accept = want.clone()                                    # the learner's, where it is asked
        for x in drawable:
            got = accept[x] = _as_float(accept_probability(p.clone(), q.clone(), x))
            if math.isclose(got, want[x].item(), rel_tol=1e-6, abs_tol=1e-12):
                continue
            if got > 1:
                raise AssertionError(f"{where}, token {x}: {got:.4g} is above 1: a probability; the rule is "
                                     f"min(1, p(x) / q(x)): a token the model likes more than the draft is always kept")
            if math.isclose(got, min(1.0, (q[x] / p[x]).item()) if p[x] > 0 else 1.0, rel_tol=1e-6):
                raise AssertionError(f"{where}, token {x}: you divided q(x) by p(x); accept with p(x) / q(x): the "
                                     f"model's probability over the draft's")
            if math.isclose(got, p[x].item(), rel_tol=1e-6):
                raise AssertionError(f"{where}, token {x}: {got:.4g} is p(x) alone; x was drawn with probability "
                                     f"q(x), so keeping it with min(1, p(x) / q(x)) makes the chance of ending at x "
                                     f"min(q, p)")
            raise AssertionError(f"{where}, token {x}: expected min(1, p(x) / q(x)) = {want[x].item():.4g}, "
                                 f"got {got:.4g}")
        residual = residual_distribution(p.clone(), q.clone())
        assert torch.is_tensor(residual) and residual.shape == p.shape, (
            f"{where}: residual_distribution should return a ({len(p)},) tensor, one probability per token")
        residual = residual.double()
        excess = torch.clamp(p - q, min=0)
        if excess.sum() == 0:                                     # p == q: nothing is ever refused
            continue
        want_r = excess / excess.sum()
        if not torch.allclose(residual, want_r, atol=1e-9):
            if (residual < -1e-12).any():
                raise AssertionError(f"{where}: the residual has negative entries; keep only where the model has more "
                                     f"than the draft: max(0, p - q)")
            elif torch.allclose(residual, excess, atol=1e-9):
                raise AssertionError(f"{where}: max(0, p - q) sums to {excess.sum().item():.3f}, not 1: normalise it")
            elif torch.allclose(residual, torch.clamp(q - p, min=0) / torch.clamp(q - p, min=0).sum(), atol=1e-9):
                raise AssertionError(f"{where}: that is max(0, q - p), the tokens the draft overrates; a refusal must "
                                     f"make up what the model is missing: max(0, p - q)")
            elif torch.allclose(residual, p, atol=1e-9):
                raise AssertionError(f"{where}: resampling from p after a refusal gives the tokens the draft "
                                     f"already had its chance at a second chance: the output is no longer "
                                     f"distributed as p. Draw from norm(max(0, p - q))")
            else:
                raise AssertionError(f"{where}: expected norm(max(0, p - q)); yours differs by up to "
                                     f"{(residual - want_r).abs().max().item():.3g}")
        # The theorem: keep x ~ q with a(x), else draw from r: the token is distributed exactly as p.
        out = q * accept + (q * (1 - accept)).sum() * residual
        assert torch.allclose(out, p, atol=1e-9), (
            f"{where}: with your rule the emitted token is distributed as something else than p, off by up to "
            f"{(out - p).abs().max().item():.3g}")
    accepted = (torch.minimum(*real).sum().item() if real is not None else None)
    print("Correct: min(1, p/q) and norm(max(0, p - q)) on every pair"
          + (", the real one included" if real is not None else "")
          + "; the emitted token is distributed exactly as p in each."
          + (f" On the real pair a guess is accepted with probability sum min(p, q) = {accepted:.3f}."
             if accepted is not None else ""))
