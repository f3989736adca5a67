"""Next-token selection: from a row of logits to one token id.

The model gives a score (logit) $z_i$ for every token in the vocabulary; softmax turns the scores
into probabilities $p_i = e^{z_i} / \\sum_j e^{z_j}$. Sampling is a short pipeline of edits to the
logits, each a function that takes logits and returns logits, so each can be plotted on its own:

    repetition penalty -> (greedy argmax if temperature == 0) -> temperature -> top-k -> top-p
    -> min-p -> softmax -> draw one token

A filter removes a token by setting its logit to $-\\infty$, so softmax gives it probability 0 and
the survivors are renormalised for free.

Ties: top-k and top-p rank tokens by logit, and equal logits rank by lower token id (a stable
sort), so the kept set never depends on sort internals or on the device. Greedy argmax picks the
lowest id among equal maxima for the same reason. min-p compares values only, so equal logits are
always kept or dropped together.

Every function accepts logits of shape (vocab,) or (batch, vocab); rows never interact.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import LlmlabError

FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. The defaults give greedy decoding."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0  # 1 means no penalty
    seed: int | None = None  # read by make_generator, once per generation

    def __post_init__(self):
        # `not (x >= 0)` rather than `x < 0` so that NaN is rejected too.
        if not _is_real(self.temperature) or not (0 <= self.temperature < math.inf):
            _invalid("temperature", "must be >= 0 (0 means greedy)", self.temperature)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            _invalid("top_k", "must be an integer >= 1, or None for no top-k", self.top_k)
        if self.top_p is not None and (not _is_real(self.top_p) or not (0 < self.top_p <= 1)):
            _invalid("top_p", "must satisfy 0 < top_p <= 1, or be None for no top-p", self.top_p)
        if self.min_p is not None and (not _is_real(self.min_p) or not (0 <= self.min_p <= 1)):
            _invalid("min_p", "must satisfy 0 <= min_p <= 1, or be None for no min-p", self.min_p)
        if not _is_real(self.repetition_penalty) or not (0 < self.repetition_penalty < math.inf):
            _invalid("repetition_penalty", "must be a finite number > 0 (1 means no penalty)",
                     self.repetition_penalty)
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed < 2**64)):
            _invalid("seed", "must be an integer in [0, 2**64), or None for a random seed", self.seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _invalid(name, rule, value):
    raise LlmlabError(f"{name} {rule}, got {value!r}")


def apply_repetition_penalty(logits: torch.Tensor, previous_ids, penalty: float) -> torch.Tensor:
    """Make tokens already in the text less likely (CTRL, Keskar et al. 2019, as Hugging Face does it).

    For every token id $i$ in previous_ids: $z_i \\leftarrow z_i / \\theta$ if $z_i > 0$, else
    $z_i \\cdot \\theta$. With $\\theta > 1$ both branches push $z_i$ down; dividing a negative
    logit would push it up, hence the two cases. A token seen twice is penalised once.

    previous_ids: (seq,) for logits (vocab,), or (batch, seq) for logits (batch, vocab).
    """
    ids = torch.as_tensor(previous_ids, dtype=torch.long, device=logits.device)
    if ids.dim() != logits.dim():
        raise LlmlabError(
            f"previous_ids must have shape (seq,) for logits (vocab,) or (batch, seq) for logits "
            f"(batch, vocab); got previous_ids {tuple(ids.shape)} and logits {tuple(logits.shape)}")
    if ids.numel() == 0 or penalty == 1.0:
        return logits
    seen = logits.gather(-1, ids)
    # A repeated id gathers and scatters the same value, so it is penalised exactly once.
    return logits.scatter(-1, ids, penalise(seen, penalty))


def penalise(logits: torch.Tensor, penalty: float) -> torch.Tensor:
    """The penalty's two cases, kept inside float32's range: a penalty beyond it (1e-300, 1e300) would
    round to 0 or inf, and a logit divided past it would be +inf; 0 * inf, and inf - inf in softmax,
    are NaN. So the penalty stops at float32's extremes, and a logit at its largest value, where it
    wins anyway."""
    penalty = min(max(penalty, torch.finfo(torch.float32).tiny), FLOAT32_MAX)
    return torch.where(logits > 0, logits / penalty, logits * penalty).clamp(max=FLOAT32_MAX)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """$z_i / T$: T < 1 sharpens the distribution towards the argmax, T > 1 flattens it to uniform."""
    if not temperature > 0:
        raise LlmlabError(f"temperature must be > 0 here (use argmax for 0), got {temperature!r}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits, set the rest to $-\\infty$.

    Exactly k survive (fewer if the vocabulary is smaller); among equal logits the lower id wins.
    """
    ranked = logits.argsort(dim=-1, descending=True, stable=True)  # ties: lower id first
    remove = torch.ones_like(logits, dtype=torch.bool).scatter(-1, ranked[..., :k], False)
    return logits.masked_fill(remove, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability sum reaches p.

    With probabilities sorted so that $p_{(1)} \\ge p_{(2)} \\ge \\dots$, keep rank $j$ while
    $\\sum_{i<j} p_{(i)} < p$: the top token always survives (its sum is 0), and a sum landing
    exactly on p stops the set there. Equal logits rank by lower id.
    """
    if p >= 1:
        # Nothing to remove. The general rule could remove something here: a float32 running sum
        # can round up to 1.0 before reaching tokens whose probability is tiny but not zero.
        return logits
    sorted_logits, ranked = logits.sort(dim=-1, descending=True, stable=True)
    sorted_probs = sorted_logits.softmax(dim=-1, dtype=torch.float32)
    reached = sorted_probs.cumsum(dim=-1) >= p  # reached[j]: ranks 1..j already sum to p
    remove_sorted = F.pad(reached[..., :-1], (1, 0), value=False)  # so rank j is dropped if reached[j-1]
    remove = torch.zeros_like(remove_sorted).scatter(-1, ranked, remove_sorted)
    return logits.masked_fill(remove, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with $p_i \\ge \\text{min\\_p} \\cdot \\max_j p_j$ (Nguyen et al. 2024).

    The cut-off scales with the model's confidence: strict when one token dominates, lenient when
    many are plausible. The most likely token always survives.
    """
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, -math.inf)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A random-number generator on `device` seeded with `seed`, or None (global RNG) for no seed.

    Make one per generation and pass it to every `sample` call: successive draws then differ,
    yet the whole sequence repeats for the same seed.
    """
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams, *, previous_ids=None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id from logits (vocab,) or (batch, vocab); returns shape () or (batch,).

    Works in float32 whatever the input dtype: bf16 logits have ties and coarse steps that would
    otherwise leak into the filters. `params.seed` is not read here; build `generator` from it
    with make_generator.
    """
    logits = logits.float()
    if previous_ids is not None:
        logits = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    if params.is_greedy:
        return logits.argmax(dim=-1)  # first (lowest) id among equal maxima
    probs = sampling_probs(logits, params)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: temperature -> top-k -> top-p -> min-p -> softmax.

    The largest logit is subtracted first, which changes no probability (softmax is shift-invariant)
    and no ranking, and keeps a tiny temperature (1e-300) from dividing logits past float32's range:
    the top logit stays 0 and the rest go to -inf, which is greedy, as the limit T -> 0 should be.
    Below float32's smallest normal number a temperature would round to 0 (and 0 / 0 is NaN), so it
    stops there, where every logit not tied with the top is -inf already.
    """
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = apply_temperature(logits - logits.amax(dim=-1, keepdim=True), temperature)
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p is not None:
        logits = min_p_filter(logits, params.min_p)
    return logits.softmax(dim=-1)


# --- on the device, inside a fixed-shape step --------------------------------------------------
# `sample` above draws with torch.multinomial and a torch.Generator: a stateful generator that
# torch.compile cannot trace and a CUDA graph would replay with the same numbers. The generation loop
# draws instead with a *counter-based* random number: a hash of (seed, position, token id), so the
# draw for a given position is a pure function of its inputs. It needs no state, costs a few integer
# operations per logit, gives the same tokens eager, compiled or replayed from a graph, on any device
# (integer maths is exact), and repeats for the same seed.

_MASK32 = 0xFFFFFFFF


def int64_seed(seed: int) -> int:
    """A seed of [0, 2**64) as the int64 with the same 64 bits (two's complement), as the sampler's
    tensors hold it: seeds from 2**63 up become negative, and keep their own random numbers."""
    return seed - 2**64 if seed >= 2**63 else seed


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds), computed in int64 so nothing overflows:
    every value stays below 2^32 and the multiplier is below 2^27."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def counter_uniform(seed: torch.Tensor, position: torch.Tensor, n: int) -> torch.Tensor:
    """(batch, n) float32 uniforms in (0, 1), one for each token id at each row's position.

    seed, position: (batch,) int64. 23 random bits per number: with 24, the largest value, 1 - 2^-25,
    would round to exactly 1.0 in float32, and -ln(1) = 0 turns a removed token's 0/0 into NaN."""
    token_ids = torch.arange(n, device=position.device)
    key = _mix32((position & _MASK32) + _mix32(seed & _MASK32)) & _MASK32           # (batch,)
    bits = _mix32(((key[:, None] + _mix32(token_ids)[None]) & _MASK32) ^ ((seed[:, None] >> 32) & _MASK32))
    return ((bits >> 9).float() + 0.5) / 2.0**23


def sample_on_device(logits: torch.Tensor, params: SamplingParams, seed: torch.Tensor, position: torch.Tensor,
                     seen: torch.Tensor | None = None) -> torch.Tensor:
    """`sample`'s pipeline on (batch, vocab) logits with fixed shapes and no host sync; returns (batch,).

    seen (batch, vocab) bool marks the tokens already in each text, for the repetition penalty (the
    same rule as apply_repetition_penalty, as a mask instead of a list that grows). The draw is the
    exponential race: token i wins with probability p_i when each gets time E_i / p_i, E_i = -ln U_i
    exponential, and the first to arrive wins (the Gumbel-max trick, in another form)."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = torch.where(seen, penalise(logits, params.repetition_penalty), logits)
    if params.is_greedy:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, params)
    waits = -torch.log(counter_uniform(seed, position, logits.shape[-1]))               # exponential, > 0
    arrival = torch.where(probs > 0, waits / probs, torch.inf)                         # removed tokens never arrive
    return arrival.argmin(dim=-1)
