"""llmlab.probe against what the engine really computes, and against Hugging Face's attention weights.

The probe recomputes attention weights from the captured layer input; the references are independent
of that code: the engine's own attention output (PyTorch's fused SDPA kernel, captured on its way into
W_o), and the weights Hugging Face `transformers` returns with `output_attentions=True`.
"""

import pytest
import torch

from llmlab import probe


@pytest.fixture(scope="module")
def ids(llm, shakespeare_text):
    return llm.tokenizer.encode(shakespeare_text[3000:6000])[:120]


def attention_output_into_wo(llm, ids, layer):
    """What the engine's attention produced in `layer`: the input of W_o, (seq, n_heads * head_dim)."""
    captured = []
    wo = llm.model.layers[layer].attention.wo
    handle = wo.register_forward_pre_hook(lambda module, args: captured.append(args[0][0]))
    try:
        llm.logits(ids)
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("layer", [0, 13, 29])
def test_weights_are_causal_probability_rows(llm, ids, layer):
    weights = probe.attention_weights(llm, ids, layer)
    n = len(ids)
    assert weights.shape == (llm.config.n_heads, n, n)
    torch.testing.assert_close(weights.sum(-1), torch.ones(llm.config.n_heads, n), rtol=0, atol=1e-5)
    above_diagonal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    assert (weights[:, above_diagonal] == 0).all(), "a query attends to a later token"
    assert (weights >= 0).all()


@pytest.mark.parametrize("layer", [0, 7, 29])
@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_weights_times_values_reproduce_the_engine(llm, ids, layer, backend):
    llm.model.set_attention(backend)
    try:
        engine_output = attention_output_into_wo(llm, ids, layer)
    finally:
        llm.model.set_attention("sdpa")
    weights = probe.attention_weights(llm, ids, layer)
    _, _, v = probe.queries_keys_values(llm, ids, layer)
    v = v.repeat_interleave(llm.config.n_heads // llm.config.n_kv_heads, dim=0)   # query head h reads KV head h // 3
    ours = (weights @ v).transpose(0, 1).reshape(len(ids), -1)                      # (seq, n_heads * head_dim)
    # only the summation order differs (~1e-5 on outputs of size ~1); a wrong mask, scale or head
    # mapping would be off by more than 1e-2
    torch.testing.assert_close(ours, engine_output, rtol=0, atol=1e-4)


def test_all_layers_in_one_pass_equal_one_layer_at_a_time(llm, ids):
    every = probe.all_attention_weights(llm, ids[:40])
    assert every.shape == (llm.config.n_layers, llm.config.n_heads, 40, 40)
    for layer in (0, 15, 29):
        torch.testing.assert_close(every[layer], probe.attention_weights(llm, ids[:40], layer), rtol=0, atol=0)


def test_keys_before_rope_rotate_into_keys_after(llm, ids):
    q0, k0, v0 = probe.queries_keys_values(llm, ids[:16], 3, rope=False)
    q, k, v = probe.queries_keys_values(llm, ids[:16], 3)
    # position 0 is rotated by angle 0; RoPE never changes a vector's length nor touches v
    torch.testing.assert_close(q0[:, 0], q[:, 0])
    torch.testing.assert_close(k0.norm(dim=-1), k.norm(dim=-1))
    assert torch.equal(v0, v)


def test_weights_equal_hugging_face_output_attentions(llm, hf_model, ids):
    hf_model.set_attn_implementation("eager")     # SDPA in transformers returns no weights
    try:
        with torch.inference_mode():
            reference = hf_model(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        hf_model.set_attn_implementation("sdpa")
    ours = probe.all_attention_weights(llm, ids)
    torch.testing.assert_close(ours, torch.stack([a[0] for a in reference]), rtol=0, atol=1e-4)


def test_head_scores_on_hand_made_patterns():
    n = 6
    previous = torch.diag(torch.ones(n - 1), diagonal=-1)
    previous[0, 0] = 1.0                                        # query 0 can only look at itself
    causal_uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    sink = torch.zeros(n, n)
    sink[:, 0] = 1.0
    assert probe.previous_token_score(previous).item() == 1.0
    assert probe.first_token_score(previous).item() == pytest.approx(1 / (n - 1))   # only query 1 looks at 0
    assert probe.first_token_score(sink).item() == 1.0
    assert probe.previous_token_score(sink).item() == pytest.approx(1 / (n - 1))
    assert probe.first_token_score(causal_uniform).item() == pytest.approx(sum(1 / i for i in range(2, n + 1)) / (n - 1))
    stacked = torch.stack([previous, sink])
    assert probe.previous_token_score(stacked).shape == (2,)
