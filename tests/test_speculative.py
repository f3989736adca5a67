"""Speculative decoding against its references: plain greedy decoding's tokens, and the model's own
sampling distribution (a chi-square test of the acceptance rule on a real next-token distribution)."""

import pytest
import torch

import llmlab
from llmlab.compress.student import shallow_student, student_dir
from llmlab.config import preset
from llmlab.corpus import prompt_ids
from llmlab.errors import LlmlabError
from llmlab.llm import LLM, bundled_model_path, random_model
from llmlab.options import EngineOptions
from llmlab.sampling import SamplingParams, sampling_probs
from llmlab.speculative import SpeculativeStats, accept, prompt_lookup, speculative_tokens

N_NEW = 48
ALPHA = 0.001          # the chi-square tests' significance level; every draw is seeded, so none is flaky


@pytest.fixture(scope="module")
def prompts(llm):
    tok = llm.tokenizer
    return {
        "repetitive": tok.encode("Monday, Tuesday, Wednesday, Thursday, Friday. Monday, Tuesday, Wednesday, "
                                 "Thursday, Friday. Monday, Tuesday,"),
        "chat": tok.encode_chat([{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
                                add_generation_prompt=True),
        "shakespeare": prompt_ids(tok, 200),
    }


@pytest.fixture(scope="module")
def greedy(llm, prompts):
    """Plain greedy decoding's tokens: the reference."""
    return {name: list(llm.generate_ids(ids, N_NEW)) for name, ids in prompts.items()}


def with_speculative(llm, spec: str) -> LLM:
    """The session's model under another speculative switch, without loading it again."""
    return LLM(llm.model, llm.tokenizer, llm.source, EngineOptions(speculative=spec))


def tiny_random_draft(vocab_size: int) -> torch.nn.Module:
    """A draft that guesses badly: random weights, SmolLM2's vocabulary, two narrow layers."""
    config = preset("smollm2-135m", vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    return random_model(config, torch.float32, torch.device("cpu"), seed=1)


# --- greedy: the tokens of plain decoding ----------------------------------------------------------

def test_prompt_lookup_through_load_gives_greedy_tokens(prompts, greedy):
    spec = llmlab.load(speculative="prompt-lookup:4")
    rates = {}
    for name, ids in prompts.items():
        assert list(spec.generate_ids(ids, N_NEW)) == greedy[name], name
        stats = spec.speculative_stats
        assert stats.emitted == N_NEW and stats.forwards < N_NEW
        rates[name] = stats.acceptance_rate
    assert rates["repetitive"] > 0.8                   # the week's days are copied from the prompt
    assert min(rates.values()) < 1                     # some guesses refused: the rollback ran


def test_the_model_as_its_own_draft_is_always_accepted(llm, prompts, greedy):
    spec = with_speculative(llm, f"draft:{bundled_model_path()}:4")    # loaded again, through load()
    for name, ids in prompts.items():
        assert list(spec.generate_ids(ids, N_NEW)) == greedy[name], name
        assert spec.speculative_stats.acceptance_rate == 1.0
        assert spec.speculative_stats.tokens_per_forward > 4       # K + 1 = 5 a round, less the last round's cut


@pytest.mark.parametrize("draft", ["two-layer student", "random"])
def test_a_poor_draft_is_often_refused_and_the_tokens_stay_greedys(llm, prompts, greedy, draft):
    """Refused guesses leave stale keys and values in both caches: each next round must overwrite them."""
    model = (shallow_student(llm, [0, llm.config.n_layers - 1]).model if draft == "two-layer student"
             else tiny_random_draft(llm.config.vocab_size))
    for name in ("chat", "shakespeare"):
        stats = SpeculativeStats()
        tokens = list(speculative_tokens(llm.model, prompts[name], N_NEW // 2, 4, draft=model, stats=stats))
        assert tokens == greedy[name][:N_NEW // 2], name
        assert stats.acceptance_rate < 1 and stats.proposed > 0


def test_a_saved_student_as_draft_gives_greedy_tokens(llm, prompts, greedy):
    saved = sorted(student_dir("x").parent.glob("*/config.json"))
    if not saved:
        pytest.skip(f"no student saved under {student_dir('x').parent} (python -m llmlab.compress.distill makes one)")
    spec = with_speculative(llm, f"draft:student:{saved[0].parent.name}:4")
    for name, ids in prompts.items():
        assert list(spec.generate_ids(ids, N_NEW)) == greedy[name], name


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_never_more_than_max_new_tokens(llm, prompts, greedy, max_new_tokens):
    spec = with_speculative(llm, "prompt-lookup:4")
    assert list(spec.generate_ids(prompts["repetitive"], max_new_tokens)) == greedy["repetitive"][:max_new_tokens]


def test_stops_after_a_stop_id_inside_an_accepted_run(llm, prompts, greedy):
    tokens = greedy["repetitive"]
    at = next(i for i in range(1, N_NEW) if tokens[i] not in tokens[:i])     # its first occurrence
    spec = with_speculative(llm, "prompt-lookup:4")
    assert list(spec.generate_ids(prompts["repetitive"], N_NEW, stop_ids={tokens[at]})) == tokens[:at + 1]


def test_sampling_repeats_for_a_seed_and_differs_for_another(llm, prompts):
    spec = with_speculative(llm, "prompt-lookup:4")
    ids = prompts["chat"]
    runs = [list(spec.generate_ids(ids, 16, temperature=1.0, top_k=20, seed=seed)) for seed in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]
    assert all(len(run) == 16 for run in runs)


def test_prompt_lookup_copies_what_followed_the_latest_ngram():
    assert prompt_lookup([1, 2, 3, 9, 7, 1, 2, 3], 3) == [9, 7, 1]
    assert prompt_lookup([4, 2, 3, 8, 1, 2, 3], 2) == [8, 1]          # (1, 2, 3) never came before: (2, 3) did
    assert prompt_lookup([5, 1, 6, 1, 7, 1], 2) == [7, 1]              # latest of the 1-gram matches
    assert prompt_lookup([5, 6, 5, 6], 4) == [5, 6, 5, 6]                # runs on into its own guesses
    assert prompt_lookup([1, 2, 3], 4) == []
    assert prompt_lookup([1, 2, 3, 1], 0) == []


# --- sampling: the model's distribution, whatever the draft ---------------------------------------

@pytest.fixture(scope="module")
def real_p_and_q(llm, prompts):
    """A real next-token distribution p (temperature 1, top-k 20) and a draft q unlike it (temperature 2,
    top-k 12: flatter, and missing some of p's tokens, which only the residual can then emit), both
    restricted to the union of their supports: every other token has probability 0 in both, and the
    rule never looks at a token's id."""
    logits = llm.logits(prompts["chat"])[-1]
    p = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=20))
    q = sampling_probs(logits, SamplingParams(temperature=2.0, top_k=12))
    support = ((p > 0) | (q > 0)).nonzero().squeeze(-1)
    return p[support], q[support]


def emitted_counts(p, q, n, rule, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draft_tokens = torch.multinomial(q, n, replacement=True, generator=generator)
    tokens = rule(p.expand(n, -1), q.expand(n, -1), draft_tokens, generator)
    return torch.bincount(tokens, minlength=len(p))


def chi_square_p_value(counts, p):
    """Pearson's chi-square test of counts against p; bins expecting fewer than 5 are pooled into one.
    The p-value is the regularised upper incomplete gamma Q(df/2, x/2), exact: no table, no scipy."""
    expected = counts.sum() * p.double()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def accept_rule(p, q, draft_tokens, generator):
    return accept(p, q, draft_tokens, generator)[0]


def always_accept(p, q, draft_tokens, generator):
    return draft_tokens


def resample_from_p_on_refusal(p, q, draft_tokens, generator):
    """A plausible bug: a refused guess replaced by a draw from p rather than from max(0, p - q)."""
    tokens, accepted = accept(p, q, draft_tokens, generator)
    return torch.where(accepted, tokens, torch.multinomial(p, 1, generator=generator).squeeze(-1))


N_DRAWS = 20_000


def test_the_acceptance_rule_emits_the_models_distribution(real_p_and_q):
    p, q = real_p_and_q
    assert (q[p > 0] == 0).any() and (p - q).abs().sum() > 0.3        # q really differs from p
    counts = emitted_counts(p, q, N_DRAWS, accept_rule)
    assert counts[p == 0].sum() == 0                                    # nothing outside the model's top-k
    assert chi_square_p_value(counts, p) > ALPHA


def test_prompt_lookups_one_hot_draft_emits_the_models_distribution(real_p_and_q):
    """A deterministic guess x: q is one-hot, accepted with probability p(x), else p with x removed."""
    p, _ = real_p_and_q
    for guess in (int(p.argmax()), int(p.argsort()[-5])):              # a likely guess and a less likely one
        q = torch.zeros_like(p)
        q[guess] = 1.0
        assert chi_square_p_value(emitted_counts(p, q, N_DRAWS, accept_rule), p) > ALPHA


@pytest.mark.parametrize("wrong_rule", [always_accept, resample_from_p_on_refusal])
def test_the_chi_square_test_catches_a_wrong_rule(real_p_and_q, wrong_rule):
    p, q = real_p_and_q
    assert chi_square_p_value(emitted_counts(p, q, N_DRAWS, wrong_rule), p) < ALPHA


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.bad_input(kind="a malformed speculative switch (unknown draft, K outside 1..16, not a text)",
                       gets="LlmlabError showing the forms none, prompt-lookup:K, draft:SOURCE:K")
@pytest.mark.parametrize("spec, message", [
    ("prompt-lookup", "write none, prompt-lookup:K or draft:SOURCE:K"),
    ("ngram:4", "write none, prompt-lookup:K or draft:SOURCE:K"),
    ("draft::4", "write none, prompt-lookup:K or draft:SOURCE:K"),
    ("prompt-lookup:0", "K must be an integer from 1 to 16"),
    ("prompt-lookup:17", "K must be an integer from 1 to 16"),
    ("draft:student:small:four", "K must be an integer from 1 to 16, not 'four'"),
    (4, "speculative takes a text such as none, prompt-lookup:4"),
])
def test_bad_speculative_switch_raises(spec, message):
    with pytest.raises(LlmlabError, match=message):
        llmlab.load(speculative=spec)


@pytest.mark.bad_input(kind="speculative with compile, CUDA graphs, fused-decode, tp > 1 or a non-static KV cache",
                       gets="LlmlabError saying what speculative decoding works with")
@pytest.mark.parametrize("switches, message", [
    ({"compile": "default"}, "turn off compile, cuda_graphs and kernels='fused-decode'"),
    ({"cuda_graphs": True}, "turn off compile, cuda_graphs"),
    ({"kernels": "fused-decode"}, "turn off compile, cuda_graphs"),
    ({"tp": 2}, "use tp=1"),
    ({"kv_cache": "paged"}, "use kv_cache='static'"),
    ({"kv_cache": "kv-int8"}, "use kv_cache='static'"),
])
def test_speculative_refuses_what_it_cannot_roll_back(switches, message):
    with pytest.raises(LlmlabError, match=message):
        llmlab.load(speculative="prompt-lookup:4", **switches)


@pytest.mark.bad_input(kind="speculative generation with a repetition penalty, another KV cache, or a draft "
                            "of another vocabulary", gets="LlmlabError before any token")
def test_speculative_generation_refuses_what_it_does_not_do(llm, prompts):
    spec = with_speculative(llm, "prompt-lookup:4")
    ids = prompts["chat"]
    with pytest.raises(LlmlabError, match="does not apply a repetition penalty"):
        spec.generate_ids(ids, 8, repetition_penalty=1.2)
    with pytest.raises(LlmlabError, match="use kv_cache='static'|leave kv_cache out"):
        spec.generate_ids(ids, 8, kv_cache="paged")
    with pytest.raises(LlmlabError, match="a draft must share the model's tokens"):
        speculative_tokens(llm.model, ids, 8, 4, draft=tiny_random_draft(1000))
