"""Property tests for llmlab.sampling.

The references here are written from the definitions with plain Python and NumPy (float64) and
never call the code under test. Where float32 (the code) and float64 (the reference) could
disagree, i.e. when a threshold lies within rounding distance of a probability or a running sum,
the example is skipped with `assume`, and the exact boundaries are tested separately on
distributions that float32 represents exactly (equal logits give probabilities 1/2, 1/4, 1/8).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llmlab.errors import LlmlabError
from llmlab.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    make_generator,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

# Hypothesis likes repeated values and round numbers, which exercises the tie rules.
logit_lists = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=40)
FAST = settings(deadline=None, max_examples=150)

# Rounding margin: float32 running sums over <= 40 tokens are off by ~1e-6 at most.
MARGIN = 1e-4


def softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def rank_order(x):
    """Token ids from most to least likely; equal logits rank by lower id (the documented rule)."""
    return sorted(range(len(x)), key=lambda i: (-x[i], i))


def kept(filtered):
    return {i for i, z in enumerate(filtered.tolist()) if z != -math.inf}


# ---- top-k ----

@FAST
@given(logits=logit_lists, k=st.integers(1, 50))
def test_top_k_filter_keeps_exactly_the_k_best(logits, k):
    x = torch.tensor(logits)
    assert kept(top_k_filter(x, k)) == set(rank_order(logits)[:k])


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**32), vocab=st.integers(2, 300), k=st.integers(1, 20),
       temperature=st.floats(0.1, 5))
def test_top_k_never_emits_a_token_outside_the_k_best(seed, vocab, k, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * 3
    best = set(rank_order(logits.tolist())[:k])
    # 200 rows of the same logits: 200 independent draws in one call.
    draws = sample(logits.expand(200, vocab), SamplingParams(temperature=temperature, top_k=k),
                   generator=g)
    assert set(draws.tolist()) <= best


# ---- temperature and greedy ----

@FAST
@given(logits=logit_lists)
def test_temperature_zero_is_argmax_with_lowest_id_on_ties(logits):
    x = torch.tensor(logits)
    assert sample(x, SamplingParams(temperature=0.0)).item() == rank_order(logits)[0]


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**32), vocab=st.integers(2, 500), gap=st.floats(0.5, 5))
def test_tiny_temperature_picks_argmax_every_time(seed, vocab, gap):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g)
    top = int(torch.randint(vocab, (), generator=g))
    logits[top] = logits.max() + gap  # a clear gap: e^{-gap / 1e-4} underflows to 0
    draws = sample(logits.expand(100, vocab), SamplingParams(temperature=1e-4), generator=g)
    assert (draws == top).all()
    assert sample(logits, SamplingParams(temperature=0.0)).item() == top


def test_temperature_divides_logits():
    x = torch.tensor([1.0, -2.0, 4.0])
    torch.testing.assert_close(apply_temperature(x, 2.0), torch.tensor([0.5, -1.0, 2.0]))
    with pytest.raises(LlmlabError, match="temperature"):
        apply_temperature(x, 0.0)


# ---- seeds ----

def test_same_seed_reproduces_the_sequence_of_samples():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.1  # flat-ish
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def draw_sequence(seed):
        g = make_generator(seed, "cpu")
        return [sample(logits, params, generator=g).item() for _ in range(20)]

    first = draw_sequence(params.seed)
    assert first == draw_sequence(params.seed)
    assert len(set(first)) > 1  # one generator per sequence: successive draws are not all alike
    # 20 draws from ~900 near-equal tokens: two seeds agreeing by chance is ~(1/900)^20.
    assert draw_sequence(params.seed + 1) != first


def test_no_seed_means_no_generator():
    assert make_generator(None, "cpu") is None
    assert isinstance(make_generator(0, torch.device("cpu")), torch.Generator)


# ---- top-p ----

def top_p_reference(logits, p):
    """Brute force: walk tokens from most likely down, stop once the running sum reaches p."""
    probs = softmax64(logits)
    keep, total = set(), 0.0
    for i in rank_order(logits):
        if total >= p:
            break
        keep.add(i)
        total += probs[i]
    return keep


def running_sums(logits):
    probs = softmax64(logits)
    return np.cumsum([probs[i] for i in rank_order(logits)])


@FAST
@given(logits=logit_lists, p=st.floats(1e-6, 1.0, exclude_max=True))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p):
    assume(np.abs(running_sums(logits) - p).min() > MARGIN)
    assert kept(top_p_filter(torch.tensor(logits), p)) == top_p_reference(logits, p)


@FAST
@given(logits=logit_lists)
def test_top_p_one_keeps_every_token_with_nonzero_probability(logits):
    logits = logits + [-math.inf]  # a token already removed stays removed
    survivors = kept(top_p_filter(torch.tensor(logits), 1.0))
    assert survivors == {i for i, z in enumerate(logits) if z != -math.inf}


@FAST
@given(logits=logit_lists)
def test_top_p_tiny_keeps_only_the_top_token(logits):
    assert kept(top_p_filter(torch.tensor(logits), 1e-9)) == {rank_order(logits)[0]}


@pytest.mark.parametrize("p, expected", [
    (0.25, {0}),            # exactly one token's mass: the set stops there
    (0.25 + 1e-3, {0, 1}),
    (0.5, {0, 1}),          # exactly on the boundary after two tokens
    (0.5 - 1e-3, {0, 1}),
    (0.5 + 1e-3, {0, 1, 2}),
    (0.75, {0, 1, 2}),
    (0.999, {0, 1, 2, 3}),
])
def test_top_p_at_an_exact_cumulative_boundary(p, expected):
    # Four equal logits give probabilities exactly 1/4 in float32, so the running sums
    # 0.25, 0.5, 0.75, 1.0 are exact; ties rank by lower id. Token 4 has probability 0.
    logits = torch.tensor([2.0, 2.0, 2.0, 2.0, -math.inf])
    assert kept(top_p_filter(logits, p)) == expected == top_p_reference(logits.tolist(), p)


def test_top_p_boundary_in_eighths():
    # Eight equal logits: probabilities exactly 1/8, so p = 3/8 lands exactly on a running sum.
    logits = torch.zeros(8)
    assert kept(top_p_filter(logits, 3 / 8)) == {0, 1, 2}
    assert kept(top_p_filter(logits, 3 / 8 + 1e-3)) == {0, 1, 2, 3}


# ---- min-p ----

@FAST
@given(logits=logit_lists, min_p=st.floats(0.0, 1.0))
def test_min_p_keeps_exactly_tokens_above_the_scaled_max(logits, min_p):
    probs = softmax64(logits)
    threshold = min_p * probs.max()
    # Exact ties with the threshold (a token tied with the max at min_p = 1) are decided the same
    # way in float32 and float64; near ties are not, e.g. logits 0 and 2e-16 tie in float32.
    assume(all(q == threshold or abs(q - threshold) > MARGIN * threshold for q in probs))
    expected = {i for i, q in enumerate(probs) if q >= threshold}
    assert kept(min_p_filter(torch.tensor(logits), min_p)) == expected


def test_min_p_keeps_ties_with_the_top_together():
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert kept(min_p_filter(logits, 1.0)) == {1, 2}


# ---- repetition penalty ----

def repetition_reference(logits, previous_ids, penalty):
    """The CTRL rule as Hugging Face applies it, once per distinct seen token."""
    out = list(logits)
    for i in set(previous_ids):
        out[i] = out[i] / penalty if out[i] > 0 else out[i] * penalty
    return out


@FAST
@given(data=st.data(), logits=logit_lists, penalty=st.floats(0.1, 5))
def test_repetition_penalty_matches_the_ctrl_rule(data, logits, penalty):
    ids = data.draw(st.lists(st.integers(0, len(logits) - 1), max_size=30))
    got = apply_repetition_penalty(torch.tensor(logits), torch.tensor(ids, dtype=torch.long), penalty)
    expected = torch.tensor(repetition_reference(logits, ids, penalty))
    torch.testing.assert_close(got, expected)


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 4
    ids = torch.randint(50, (3, 12), generator=g)
    for penalty in (0.5, 1.0, 1.3, 3.0):
        hf = transformers.RepetitionPenaltyLogitsProcessor(penalty=penalty)(ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, ids, penalty), hf)


def test_repetition_penalty_leaves_its_input_alone_and_accepts_lists():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0]))
    torch.testing.assert_close(logits, torch.tensor([2.0, -2.0, 1.0]))
    with pytest.raises(LlmlabError, match="previous_ids"):
        apply_repetition_penalty(torch.zeros(2, 3), [0, 1], 2.0)


def test_sample_applies_the_penalty_before_greedy():
    logits = torch.tensor([3.0, 2.0, -1.0])
    params = SamplingParams(repetition_penalty=2.0)
    assert sample(logits, params).item() == 0
    assert sample(logits, params, previous_ids=[0]).item() == 1  # 3/2 < 2


# ---- the sampled distribution ----

def assert_frequencies_match(draws, probs, n):
    """Each token count is Binomial(n, p): allow 4.5 standard deviations, sqrt(p(1-p)/n).

    With the seed fixed the test is deterministic; 4.5 sigma makes a fluke failure for a new seed
    rarer than 1 in 10^4 across all tokens, while a wrong distribution (say one token off by 0.02
    in probability) sits many sigma away at n = 20k.
    """
    freq = np.bincount(draws.numpy(), minlength=len(probs)) / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 4.5 * sigma + 1e-12), (freq, probs)


def test_temperature_one_samples_follow_softmax():
    n = 20_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    g = make_generator(7, "cpu")
    draws = sample(logits.expand(n, -1), SamplingParams(temperature=1.0), generator=g)
    assert_frequencies_match(draws, softmax64(logits.tolist()), n)


def test_filtered_samples_follow_the_renormalised_survivors():
    n = 20_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    temperature, k = 0.7, 4
    g = make_generator(11, "cpu")
    draws = sample(logits.expand(n, -1), SamplingParams(temperature=temperature, top_k=k), generator=g)
    scaled = np.array(logits.tolist()) / temperature
    best = rank_order(scaled.tolist())[:k]
    masked = np.full_like(scaled, -np.inf)
    masked[best] = scaled[best]
    assert_frequencies_match(draws, softmax64(masked), n)


# ---- batches and dtypes ----

@settings(deadline=None, max_examples=50)
@given(seed=st.integers(0, 2**32), batch=st.integers(1, 5), vocab=st.integers(1, 60),
       k=st.integers(1, 10), p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5))
def test_batch_rows_are_filtered_independently(seed, batch, vocab, k, p, min_p):
    g = torch.Generator().manual_seed(seed)
    # Rows on very different scales: a shared threshold across rows would show up.
    logits = torch.randn(batch, vocab, generator=g) * torch.logspace(-1, 1, batch)[:, None]
    ids = torch.randint(vocab, (batch, 7), generator=g)
    for name, batched, one_row in [
        ("top_k", top_k_filter(logits, k), lambda r: top_k_filter(logits[r], k)),
        ("top_p", top_p_filter(logits, p), lambda r: top_p_filter(logits[r], p)),
        ("min_p", min_p_filter(logits, min_p), lambda r: min_p_filter(logits[r], min_p)),
        ("penalty", apply_repetition_penalty(logits, ids, 1.7),
         lambda r: apply_repetition_penalty(logits[r], ids[r], 1.7)),
    ]:
        for r in range(batch):
            assert torch.equal(batched[r], one_row(r)), name


def test_batch_sampling_shapes_and_independent_rows():
    n = 4000
    vocab = 6
    # Row 0 is certain of token 4; row 1 is uniform. Sampling n copies of both rows at once.
    row0 = torch.full((vocab,), -math.inf)
    row0[4] = 0.0
    row1 = torch.zeros(vocab)
    logits = torch.stack([row0, row1]).repeat(n, 1)  # (2n, vocab), rows alternate
    draws = sample(logits, SamplingParams(temperature=1.0), generator=make_generator(3, "cpu"))
    assert draws.shape == (2 * n,) and draws.dtype == torch.long
    assert (draws[0::2] == 4).all()
    assert_frequencies_match(draws[1::2], np.full(vocab, 1 / vocab), n)

    greedy = sample(torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 1.0]]), SamplingParams())
    assert greedy.tolist() == [1, 0]
    single = sample(torch.tensor([0.0, 5.0, 1.0]), SamplingParams(temperature=1.0, top_k=1))
    assert single.shape == () and single.item() == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype(dtype):
    logits = torch.tensor([0.5, 3.0, -1.0, 2.5], dtype=dtype)
    assert sample(logits, SamplingParams()).item() == 1
    draw = sample(logits, SamplingParams(temperature=0.8, top_k=2, top_p=0.9, min_p=0.05,
                                         repetition_penalty=1.2),
                  previous_ids=[3], generator=make_generator(0, "cpu"))
    assert draw.dtype == torch.long and draw.item() in (1, 3)


# ---- parameter validation ----

@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "hot"),
    ("top_k", 0), ("top_k", -3), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", float("nan")),
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", float("nan")),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("seed", -1), ("seed", 1.5), ("seed", 2**64),
])
@pytest.mark.bad_input(kind='an invalid SamplingParams field', gets='LlmlabError naming the field and its range')
def test_each_invalid_parameter_is_named_in_the_error(field, value):
    with pytest.raises(LlmlabError, match=rf"^{field} ") as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value)  # the message shows what was passed


@pytest.mark.parametrize("params", [
    SamplingParams(), SamplingParams(temperature=0.7, top_k=1, top_p=1.0, min_p=0.0),
    SamplingParams(top_p=1e-9, min_p=1.0, repetition_penalty=0.5, seed=0),
])
def test_valid_parameters_are_accepted(params):
    assert params.is_greedy == (params.temperature == 0)


# ---- CUDA ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 49152, generator=g) * 3
    logits[:, :100] = logits[:, :100].round()  # plenty of ties, to check the tie rule on the GPU
    ids = torch.randint(49152, (4, 30), generator=g)
    on_gpu = logits.cuda()
    for cpu, gpu in [
        (top_k_filter(logits, 50), top_k_filter(on_gpu, 50)),
        (top_p_filter(logits, 0.9), top_p_filter(on_gpu, 0.9)),
        (min_p_filter(logits, 0.05), min_p_filter(on_gpu, 0.05)),
        (apply_repetition_penalty(logits, ids, 1.3), apply_repetition_penalty(on_gpu, ids.cuda(), 1.3)),
    ]:
        assert kept(cpu.flatten()) == kept(gpu.cpu().flatten())
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=5)

    def draws():
        gen = make_generator(params.seed, "cuda")
        return [sample(on_gpu, params, previous_ids=ids.cuda(), generator=gen).tolist() for _ in range(5)]

    assert draws() == draws()
    assert sample(on_gpu.half(), SamplingParams()).device.type == "cuda"
