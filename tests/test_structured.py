"""Structured pruning and per-layer widths: a model with whole MLP channels and heads removed must
compute what the full model computes with the same weights zeroed; its config, caches and parameter
counts must follow each layer's widths; it must save, load and generate."""

import json

import pytest
import torch

import llmlab
from llmlab.compress.calibration import block_linears, calibration_ids, input_norms
from llmlab.compress.structured import choose_kept, mask_structures, prune_structured, remove_structures
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.hf import save_folder
from llmlab.kv_cache import BlockPool, KVCache, QuantizedKVCache, make_cache
from llmlab.llm import LLM, random_model
from llmlab.profile import dense_weight_bytes, stage_costs, stage_weight_bytes

# 3 layers, 6 query heads in 3 KV groups of 2, head_dim 8
TINY = ModelConfig(vocab_size=101, dim=48, n_layers=3, n_heads=6, n_kv_heads=3, ffn_dim=40, max_seq_len=64)
# widths as structured pruning leaves them: layer 1 lost a KV group, layer 2 one head per group
PRUNED = ModelConfig(**{**TINY.__dict__, "layer_ffn_dims": (40, 10, 25), "layer_heads": (6, 4, 3),
                        "layer_kv_heads": (3, 2, 3)})
PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def raises(match):
    return pytest.raises(LlmlabError, match=match)


def tiny_llm() -> LLM:
    return LLM(random_model(TINY, torch.float32, torch.device("cpu"), seed=1), None, "tiny")


def test_per_layer_widths_are_validated():
    with raises("layer_heads has 2 entries for 3 layers"):
        ModelConfig(**{**TINY.__dict__, "layer_heads": (6, 4)})
    with raises("layer 1 has 4 query heads and 3 key/value heads: grouped-query attention needs"):
        ModelConfig(**{**TINY.__dict__, "layer_heads": (6, 4, 6)})
    with raises("layer_ffn_dims must be positive integers, got \\[40, 0, 25\\]"):
        ModelConfig(**{**TINY.__dict__, "layer_ffn_dims": (40, 0, 25)})
    from_json = ModelConfig(**{**TINY.__dict__, "layer_heads": [3, 6, 9]})     # a list becomes a tuple
    assert from_json.layer_heads == (3, 6, 9) and hash(from_json)
    with raises("mlp_keep must be fractions kept, in \\(0, 1\\]"):
        prune_structured(tiny_llm(), mlp_keep=0.0, ids=[1, 2, 3])
    with raises("heads_keep has 2 fractions for 3 layers"):
        prune_structured(tiny_llm(), heads_keep=[0.5, 0.5], ids=[1, 2, 3])


def test_parameters_and_kv_cache_of_layers_of_different_widths_by_hand():
    d, hd, vocab = 48, 8, 101
    per_layer = [(6, 3, 40), (4, 2, 10), (3, 3, 25)]               # (heads, kv heads, MLP channels)
    blocks = sum(2 * d * h * hd + 2 * d * kv * hd + 3 * d * f + 2 * d for h, kv, f in per_layer)
    model = random_model(PRUNED, torch.float32, torch.device("cpu"))
    assert PRUNED.n_params() == vocab * d + blocks + d == sum(p.numel() for p in model.parameters())
    assert dense_weight_bytes(PRUNED, 4) == stage_weight_bytes(model)     # the profiler's, from config and module
    costs = stage_costs(PRUNED, n_new=1, context=5)
    assert costs["mlp"].flops == 6 * d * (40 + 10 + 25) and costs["attention_core"].flops == 4 * 5 * (6 + 4 + 3) * hd
    kv_values_per_token = 2 * (3 + 2 + 3) * hd                     # keys and values of every layer's KV heads
    assert PRUNED.kv_cache_bytes(10, batch=2, bytes_per_value=2) == kv_values_per_token * 10 * 2 * 2
    assert KVCache(PRUNED, 10, batch=2).nbytes == kv_values_per_token * 10 * 2 * 4
    assert QuantizedKVCache(PRUNED, 10).nbytes == kv_values_per_token * 10 + kv_values_per_token // hd * 10 * 4
    assert BlockPool(PRUNED, n_blocks=3, block_size=4).nbytes == kv_values_per_token * 12 * 4


@pytest.mark.parametrize("kind", ["static", "kv-bf16", "kv-int8", "paged"])
@torch.inference_mode()
def test_every_cache_holds_layers_of_different_widths(kind):
    """Prefill then two decode steps through each cache give the full forward's logits: exactly for
    the caches that store fp32, within a tenth of the logits' spread (0.15) for bf16 and int8."""
    model = random_model(PRUNED, torch.float32, torch.device("cpu"))
    tokens = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = make_cache(kind, PRUNED, 12, torch.float32, "cpu")
    steps = [model(tokens[:, :10], 0, cache), model(tokens[:, 10:11], 10, cache), model(tokens[:, 11:], 11, cache)]
    atol = {"static": 1e-6, "paged": 1e-6, "kv-bf16": 1e-2, "kv-int8": 1e-2}[kind]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(tokens), rtol=0, atol=atol)
    if kind == "static":                                           # the fixed-shape path reads the whole buffer
        model.make_rope_table()
        fixed = make_cache(kind, PRUNED, 12, torch.float32, "cpu")
        got = torch.cat([model(tokens[:, :10], torch.tensor([0]), fixed),
                         model(tokens[:, 10:], torch.tensor([10]), fixed)], dim=1)
        torch.testing.assert_close(got, model(tokens), rtol=0, atol=1e-6)


@torch.inference_mode()
def test_the_highest_scores_are_kept():
    """Against scores computed here from the activations themselves: ‖X_j‖‖W_:,j‖ of W_down's and
    W_o's inputs, recorded by hooks on a small random model."""
    llm = tiny_llm()
    ids = list(range(1, 90))
    inputs = {}

    def record(key):
        def hook(module, args, output):
            inputs[key] = args[0][0]                               # (tokens, in_features)
        return hook
    handles = [linear.register_forward_hook(record(key)) for i, block in enumerate(llm.model.layers)
               for key, linear in (((i, "mlp"), block.mlp.w_down), ((i, "heads"), block.attention.wo))]
    norms = input_norms(llm.model, ids)                            # runs the forward the hooks record
    for handle in handles:
        handle.remove()
    kept = choose_kept(llm.model, norms, mlp_keep=[1.0, 0.5, 0.25], heads_keep=0.5, kv_heads_keep=[1.0, 2 / 3, 1.0])
    for i, (block, layer) in enumerate(zip(llm.model.layers, kept)):
        x, w = inputs[i, "mlp"], block.mlp.w_down.weight
        scores = x.norm(dim=0) * w.norm(dim=0)
        assert set(layer.channels.tolist()) == set(scores.topk(round([1.0, 0.5, 0.25][i] * 40)).indices.tolist())
        x, w = inputs[i, "heads"], block.attention.wo.weight
        heads = torch.stack([(x[:, h * 8:(h + 1) * 8].norm(dim=0) * w[:, h * 8:(h + 1) * 8].norm(dim=0)).norm()
                             for h in range(6)])                   # 6 heads: KV group g serves heads 2g, 2g+1
        groups = heads.view(3, 2)
        best_groups = groups.norm(dim=1).topk([3, 2, 3][i]).indices
        assert set(layer.kv_heads.tolist()) == set(best_groups.tolist())
        assert layer.heads.tolist() == sorted(2 * g + int(groups[g].argmax()) for g in best_groups.tolist())


@torch.inference_mode()
def test_removed_equals_masked_on_a_small_model():
    llm = tiny_llm()
    kept = choose_kept(llm.model, {name: torch.rand(linear.in_features, generator=torch.Generator().manual_seed(3))
                                   for name, linear in block_linears(llm.model).items()},
                       mlp_keep=[0.5, 0.25, 1.0], heads_keep=[1.0, 0.5, 0.5], kv_heads_keep=[2 / 3, 1.0, 1 / 3])
    small, masked = remove_structures(llm, kept), mask_structures(llm, kept)
    assert (small.config.layer_ffn_dims, small.config.layer_heads, small.config.layer_kv_heads) == (
        (20, 10, 40), (4, 3, 1), (2, 3, 1))
    for i, block in enumerate(masked.model.layers):                # zeroed: what the smaller model lacks
        zero_columns = (block.mlp.w_down.weight == 0).all(dim=0).sum().item()
        zero_head_columns = (block.attention.wo.weight == 0).all(dim=0).sum().item()
        assert zero_columns == 40 - small.config.ffn_dim_of(i)
        assert zero_head_columns == (6 - small.config.heads_of(i)) * 8
    ids = list(range(3, 40))
    torch.testing.assert_close(small.logits(ids), masked.logits(ids), rtol=0, atol=1e-5)
    assert small.config.n_params() == sum(p.numel() for p in small.model.parameters()) < TINY.n_params()
    ids = list(range(1, 60))                                       # prune_structured: the same three steps
    once = prune_structured(llm, mlp_keep=0.5, heads_keep=0.5, ids=ids)
    steps = remove_structures(llm, choose_kept(llm.model, input_norms(llm.model, ids), 0.5, 0.5))
    assert torch.equal(once.logits(ids), steps.logits(ids))


@pytest.fixture(scope="module")
def norms(llm):
    return input_norms(llm.model, calibration_ids(llm.tokenizer, 128))


@pytest.fixture(scope="module")
def pruned(llm, norms):
    """SmolLM2 with a different width in each layer: MLP 25 % or 75 %, 2 of 3 query heads per KV head,
    and every third layer one KV group fewer."""
    n = llm.config.n_layers
    kept = choose_kept(llm.model, norms, mlp_keep=[0.25 + 0.5 * (i % 2) for i in range(n)],
                       heads_keep=2 / 3, kv_heads_keep=[2 / 3 if i % 3 == 0 else 1.0 for i in range(n)])
    return kept, remove_structures(llm, kept)


@torch.inference_mode()
def test_removed_equals_masked_on_smollm2(llm, pruned):
    """In float64: fp32 rounds the two models' differently ordered sums apart by ~3e-4 in logits of
    size ~30 after 30 layers; in fp64 that is far below the tolerance, and a wrong channel or head is not."""
    kept, small = pruned
    config = small.config
    assert config.layer_ffn_dims[:2] == (384, 1152) and set(config.layer_heads) == {4, 6}
    assert config.layer_kv_heads[:3] == (2, 3, 3) and config.n_params() < 0.7 * llm.config.n_params()
    tokens = torch.tensor([llm.tokenizer.encode(PROMPT)])
    got, want = (m.model.double()(tokens) for m in (remove_structures(llm, kept), mask_structures(llm, kept)))
    assert (got - want).abs().max().item() <= 1e-5


def test_pruned_smollm2_generates_and_round_trips_through_a_folder(llm, pruned, tmp_path):
    _, small = pruned
    ids = llm.tokenizer.encode(PROMPT)
    cached = list(small.generate_ids(ids, max_new_tokens=4, stop_ids=set()))
    assert cached == list(small.generate_ids(ids, max_new_tokens=4, use_cache=False, stop_ids=set()))
    assert len(list(small.generate_ids(ids, max_new_tokens=4, kv_cache="kv-int8", stop_ids=set()))) == 4
    save_folder(small, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["llmlab_layer_ffn_dims"][:2] == [384, 1152] and saved["llmlab_layer_kv_heads"][:3] == [2, 3, 3]
    back = llmlab.load(tmp_path)
    assert back.config == small.config
    assert torch.equal(back.logits(ids), small.logits(ids))


def test_uniformly_pruned_folder_is_a_plain_llama_that_transformers_loads(llm, norms, tmp_path):
    """Pruned alike in every layer (MLP 50 %, 6 of 9 heads), the folder needs no llmlab keys:
    transformers, the independent reference, must compute the same logits from it."""
    transformers = pytest.importorskip("transformers")
    small = remove_structures(llm, choose_kept(llm.model, norms, mlp_keep=0.5, heads_keep=2 / 3))
    save_folder(small, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not [key for key in saved if key.startswith("llmlab")]
    assert (saved["intermediate_size"], saved["num_attention_heads"], saved["num_key_value_heads"]) == (768, 6, 3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(small.logits(ids), theirs, rtol=0, atol=1e-4)


def test_save_folder_round_trip_of_the_full_model(llm, tmp_path):
    """Bit-identical logits, and a tokenizer.json that both llmlab and Hugging Face's tokenizers read
    back to the same ids (text with digits, runs of whitespace and control tokens)."""
    tokenizers = pytest.importorskip("tokenizers")
    save_folder(llm, tmp_path)
    back = llmlab.load(tmp_path)
    text = "In 1492, Columbus sailed\n\n  the ocean blue. <|im_start|>user\nHi!<|im_end|>"
    ids = llm.tokenizer.encode(text)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert back.tokenizer.encode(text) == ids == theirs.encode(text).ids
    assert back.tokenizer.chat_template == llm.tokenizer.chat_template
    assert torch.equal(back.logits(ids), llm.logits(ids))
