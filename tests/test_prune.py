"""Pruning (llmlab.compress.unstructured, .semi_structured) and the `sparsity` switch.

The references are written another way than the code: sorts and Python loops instead of topk and
thresholds, input norms from captured input matrices instead of the hooks' running sums of squares.
"""

import json
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import llmlab
from llmlab import LlmlabError
from llmlab.compress import semi_structured, unstructured
from llmlab.compress.calibration import block_linears, calibration_ids, input_norms
from llmlab.compress.semi_structured import mask_2_4
from llmlab.compress.unstructured import global_magnitude_masks, magnitude_mask, wanda_mask, wanda_scores
from llmlab.config import preset
from llmlab.corpus import play_text
from llmlab.eval import perplexity
from llmlab.llm import LLM, parse_dtype, random_model
from llmlab.quant import quantize_model
from llmlab.quant.evaluate import held_out_ids


def random_weight(out_features, in_features, seed=0, scale=1.0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * scale


def sort_reference_mask(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Keep mask from a stable sort of the flattened scores: the first n_pruned in sorted order go."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().sort(stable=True).indices[:n_pruned]] = False
    return keep.view(scores.shape)


# --- masks, on tensors ---------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_prunes_the_smallest_of_the_whole_matrix(sparsity):
    weight = random_weight(576, 1536)
    keep = magnitude_mask(weight, sparsity)
    n_pruned = round(sparsity * weight.numel())
    assert int((~keep).sum()) == n_pruned
    assert torch.equal(keep, sort_reference_mask(weight.abs(), n_pruned))   # random floats: no ties
    rows_pruned = (~keep).sum(1)
    assert sparsity == 0 or rows_pruned.min() != rows_pruned.max()          # a matrix, not row by row


def test_magnitude_mask_counts_exactly_through_ties(llm):
    weight = llm.model.layers[3].mlp.w_down.weight          # Q4_1: 16 values per group of 32, many ties
    assert weight.abs().flatten().unique().numel() < weight.numel() // 2
    keep = magnitude_mask(weight, 0.5)
    assert int((~keep).sum()) == weight.numel() // 2
    assert weight.abs()[~keep].max() <= weight.abs()[keep].min()


def test_wanda_mask_prunes_half_of_every_row(llm, dense_norms):
    weight = llm.model.layers[5].mlp.w_down.weight                       # (576, 1536)
    keep = wanda_mask(weight, dense_norms["layers.5.mlp.w_down"], 0.5)
    assert weight.shape == (576, 1536)
    assert ((~keep).sum(1) == 768).all()


def test_wanda_mask_against_a_loop_over_scores(llm, dense_norms):
    """Rows 0..3 of a real layer with the real calibration norms, scored and ranked in Python."""
    weight, norm = llm.model.layers[7].attention.wk.weight, dense_norms["layers.7.attention.wk"]
    keep = wanda_mask(weight, norm, 0.3)
    k = round(0.3 * weight.shape[1])
    for i in range(4):
        scores = [abs(weight[i, j].item()) * norm[j].item() for j in range(weight.shape[1])]
        assert wanda_scores(weight, norm)[i].tolist() == pytest.approx(scores, rel=1e-6)
        pruned = set(sorted(range(len(scores)), key=scores.__getitem__)[:k])
        assert [j for j in range(len(scores)) if not keep[i, j]] == sorted(pruned)


def test_wanda_differs_from_magnitude_where_inputs_differ():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert magnitude_mask(weight, 0.5).tolist() == [[False, False, True, True]]
    loud_first = torch.tensor([100.0, 10.0, 1.0, 1.0])      # ‖X_j‖: channel 0 carries the most
    assert wanda_mask(weight, loud_first, 0.5).tolist() == [[True, True, False, False]]


def test_global_magnitude_is_one_threshold_across_layers():
    # three layers of different sizes and scales, with ties (weights on a grid, as quantized ones are)
    weights = {f"layer{i}": torch.randint(-20, 21, shape, generator=torch.Generator().manual_seed(i)) * scale
               for i, (shape, scale) in enumerate([((64, 96), 1.0), ((32, 64), 0.25), ((96, 32), 4.0)])}
    masks = global_magnitude_masks(weights, 0.5)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)
    reference = sort_reference_mask(torch.cat([w.abs().flatten() for w in weights.values()]), round(0.5 * total))
    assert torch.equal(torch.cat([m.flatten() for m in masks.values()]), reference)
    fractions = [float((~m).float().mean()) for m in masks.values()]
    assert fractions[1] > 0.8 and fractions[2] < 0.3       # the small-scale layer loses most, the large least
    per_layer = {name: magnitude_mask(w, 0.5) for name, w in weights.items()}
    assert all(int((~m).sum()) == round(0.5 * m.numel()) for m in per_layer.values())


def test_mask_2_4_keeps_the_two_largest_of_every_four():
    weight = random_weight(32, 64, seed=1)
    norm = random_weight(1, 64, seed=2)[0].abs()
    for keep, scores in ((mask_2_4(weight), weight.abs()), (mask_2_4(weight, norm), weight.abs() * norm)):
        assert (keep.view(32, 16, 4).sum(-1) == 2).all()
        for i in range(32):
            for g in range(16):
                group = scores[i, 4 * g:4 * g + 4].tolist()
                kept = sorted(sorted(range(4), key=group.__getitem__)[2:])
                assert [j for j in range(4) if keep[i, 4 * g + j]] == kept
    assert not torch.equal(mask_2_4(weight), mask_2_4(weight, norm))


@pytest.mark.parametrize("call, message", [
    (lambda w: magnitude_mask(w, 1.0), "sparsity must be a fraction in \\[0, 1\\)"),
    (lambda w: magnitude_mask(w, -0.1), "sparsity must be a fraction"),
    (lambda w: wanda_mask(w, torch.ones(7), 0.5), "one input norm per input"),
    (lambda w: mask_2_4(w[:, :6]), "multiple of 4"),
])
def test_bad_mask_arguments_raise(call, message):
    with pytest.raises(LlmlabError, match=message):
        call(random_weight(8, 16))


# --- calibration ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_norms(llm):
    return unstructured.calibration_norms(llm)


def test_input_norms_are_the_column_norms_of_the_captured_inputs(llm):
    ids = llm.tokenizer.encode(play_text("hamlet_gut.txt"))[:600]       # two chunks: 512 and 88 tokens
    captured, linears = defaultdict(list), block_linears(llm.model)
    # the fused matmuls would bypass the q/k/v and gate/up modules; unfused out here, input_norms leaves
    # the session's model as it found it
    llm.model.fuse_projections(False)
    try:
        handles = [linear.register_forward_pre_hook(lambda module, args, name=name: captured[name].append(args[0][0]))
                   for name, linear in linears.items()]
        try:
            with torch.inference_mode():
                for start in (0, 512):
                    llm.model(torch.tensor([ids[start:start + 512]]))
        finally:
            for handle in handles:
                handle.remove()
        norms = input_norms(llm.model, ids, chunk=512)
    finally:
        llm.model.fuse_projections(True)
    # layer 0's q, k and v read RMSNorm(embedding) of each token: no hooks, no chunks
    with torch.no_grad():
        x0 = llm.model.layers[0].attn_norm(llm.model.embed(torch.tensor(ids)))
    torch.testing.assert_close(norms["layers.0.attention.wq"], torch.linalg.norm(x0, dim=0), rtol=1e-5, atol=0)
    # every layer: every input matrix kept whole, then its column norms
    for name in linears:
        inputs = torch.cat(captured[name])                                  # (600, in_features)
        torch.testing.assert_close(norms[name], torch.linalg.norm(inputs, dim=0), rtol=1e-5, atol=1e-6)


# --- pruning a model in place --------------------------------------------------------------------

def tiny_llm(tokenizer=None) -> LLM:
    """Two random SmolLM2-shaped layers (its vocabulary, so that its tokenizer can calibrate them)."""
    config = preset("smollm2-135m", n_layers=2, max_seq_len=512)
    return LLM(random_model(config, torch.float32, torch.device("cpu"), seed=0), tokenizer, "tiny")


def test_prune_zeroes_the_masked_weights_and_leaves_the_rest():
    llm = tiny_llm()
    llm.model.fuse_projections(True)
    before = {name: linear.weight.detach().clone() for name, linear in block_linears(llm.model).items()}
    embed = llm.model.embed.weight.detach().clone()
    counts = unstructured.prune(llm, "magnitude", 0.4)
    assert counts == {name: round(0.4 * w.numel()) for name, w in before.items()}
    for name, linear in block_linears(llm.model).items():
        keep = magnitude_mask(before[name], 0.4)
        assert (linear.weight[~keep] == 0).all() and torch.equal(linear.weight[keep], before[name][keep])
    assert torch.equal(llm.model.embed.weight, embed) and llm.model.head.weight is llm.model.embed.weight
    attention = llm.model.layers[1].attention                 # the fused matrix is the same storage
    assert torch.equal(attention.wqkv, torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight]))


def test_wanda_prunes_a_fused_model_it_calibrates(llm):
    tiny = tiny_llm(llm.tokenizer)
    tiny.model.fuse_projections(True)
    before = {name: linear.weight.detach().clone() for name, linear in block_linears(tiny.model).items()}
    norms = input_norms(tiny_llm().model, calibration_ids(llm.tokenizer, 256))     # the same weights, unfused
    counts = semi_structured.prune_2_4(tiny, "wanda", calibration_tokens=256)
    assert counts == {name: w.numel() // 2 for name, w in before.items()}
    for name, linear in block_linears(tiny.model).items():
        assert not linear.weight.is_inference()          # still an ordinary tensor: zeroed in place above
        assert torch.equal(linear.weight, before[name] * mask_2_4(before[name], norms[name]))
    mlp = tiny.model.layers[0].mlp
    assert torch.equal(mlp.w_gate_up, torch.cat([mlp.w_gate.weight, mlp.w_up.weight]))


def test_prune_refuses_what_it_cannot_do():
    with pytest.raises(LlmlabError, match="has no tokenizer"):
        unstructured.prune(tiny_llm(), "wanda", 0.5)
    with pytest.raises(LlmlabError, match="has no tokenizer"):
        semi_structured.prune_2_4(tiny_llm(), "wanda")
    with pytest.raises(LlmlabError, match="within an output row"):
        unstructured.prune(tiny_llm(), "wanda", 0.5, scope="global")
    quantized = tiny_llm()
    quantize_model(quantized.model, "int8")
    with pytest.raises(LlmlabError, match="prune float weights"):
        semi_structured.prune_2_4(quantized, "magnitude")


# --- the sparsity switch on the real model -------------------------------------------------------

@pytest.fixture(scope="module")
def pruned():
    """llmlab.load(sparsity=spec), each loaded once."""
    models = {}

    def get(spec: str, **switches):
        key = (spec, *sorted(switches.items()))
        if key not in models:
            models[key] = llmlab.load(sparsity=spec, **switches)
        return models[key]
    return get


@pytest.mark.parametrize("spec, switches", [("magnitude:0.5", {}), ("wanda:0.5", {}), ("2:4", {"dtype": "bf16"})])
def test_the_switch_gives_the_functions_weights(spec, switches, llm, dense_norms, pruned):
    """Pruned from the fp32 weights (calibrated in fp32 too), then cast to the model's dtype and fused."""
    masks = {"magnitude:0.5": lambda name, w: magnitude_mask(w, 0.5),
             "wanda:0.5": lambda name, w: wanda_mask(w, dense_norms[name], 0.5),
             "2:4": lambda name, w: mask_2_4(w, dense_norms[name])}[spec]
    model = pruned(spec, **switches).model
    dtype = parse_dtype(switches.get("dtype", "fp32"))
    for (name, dense), linear in zip(block_linears(llm.model).items(), block_linears(model).values()):
        expected = dense.weight.masked_fill(~masks(name, dense.weight), 0.0).to(dtype)
        assert torch.equal(linear.weight, expected), name
    assert torch.equal(model.embed.weight, llm.model.embed.weight.to(dtype))
    assert model.layers[0].attention.wqkv is not None                   # fused after pruning, as by default


def test_pruning_comes_before_int8_whose_zeros_stay_zero(llm, pruned):
    model = pruned("magnitude:0.5", weights="int8").model
    for dense, quantized in zip(block_linears(llm.model).values(), block_linears(model).values()):
        keep = magnitude_mask(dense.weight, 0.5)
        assert (quantized.weight[~keep] == 0).all()                      # the int8 q of every pruned weight


def test_wanda_keeps_perplexity_lower_than_magnitude_at_half_sparsity(llm, pruned):
    """Sun et al. 2023's finding, on 1024 held-out tokens of SmolLM2 (measured: about 32 dense, 65 Wanda,
    480 magnitude)."""
    ids = held_out_ids(llm.tokenizer, 1024)
    dense, wanda, magnitude = (perplexity(m, ids) for m in (llm, pruned("wanda:0.5"), pruned("magnitude:0.5")))
    assert dense < wanda < magnitude / 2


@pytest.mark.parametrize("switches, message", [
    ({"sparsity": "magnitude:1.5"}, "sparsity must be a fraction in \\[0, 1\\)"),
    ({"sparsity": "magnitude:half"}, "'half' is not a number"),
    ({"sparsity": "wanda-global:0.5"}, "not offered"),
    ({"sparsity": "random:0.5"}, "write none, magnitude:S"),
    ({"sparsity": "2:8"}, "write none, magnitude:S"),
    ({"sparsity": 0.5}, "sparsity takes a text such as"),
    ({"sparsity": "wanda:0.5", "weights": "int4"}, "would not stay sparse"),
])
def test_bad_sparsity_switches_raise(switches, message):
    with pytest.raises(LlmlabError, match=message):
        llmlab.load(**switches)


# --- the GPU's 2:4 kernels -----------------------------------------------------------------------

def test_weight_shapes_are_the_presets_linears():
    assert semi_structured.weight_shapes("llama-3-8b") == {
        (4096, 4096): ["wq", "wo"], (1024, 4096): ["wk", "wv"], (14336, 4096): ["w_gate", "w_up"],
        (4096, 14336): ["w_down"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_the_sparse_kernels_refuse_a_cpu():
    with pytest.raises(LlmlabError, match="NVIDIA GPUs only"):
        semi_structured.benchmark()
    with pytest.raises(LlmlabError, match="NVIDIA GPUs only"):
        semi_structured.to_sparse_2_4(random_weight(64, 64).half())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(1,), (64,), (2, 16)], ids=["one-token", "64-tokens", "batch-2x16"])
def test_sparse_kernel_matches_the_dense_masked_linear(dtype, tolerance, shape):
    """cuSPARSELt's F.linear on the compressed 2:4 weight against the dense one of the same zeros: the
    same products, summed in another order, so they agree to a few roundings of the dtype (tolerance
    relative to the largest output). One token is padded to the kernel's minimum rows by PyTorch."""
    weight = random_weight(256, 512, seed=3, scale=512 ** -0.5).cuda()
    weight = (weight * mask_2_4(weight)).to(dtype)
    x = torch.randn(*shape, 512, device="cuda", dtype=dtype)
    dense = F.linear(x, weight).float()
    sparse = F.linear(x, semi_structured.to_sparse_2_4(weight)).float()
    assert sparse.shape == dense.shape == (*shape, 256)
    assert (sparse - dense).abs().max() <= tolerance * dense.abs().max()


@pytest.mark.gpu
def test_the_benchmark_report_is_json_with_a_correct_sparse_result():
    report = semi_structured.benchmark(presets=("smollm2-135m",), tokens=(1, 64), dtypes=("bf16",),
                                       warmup=1, repeats=3, calls=2)
    assert json.loads(json.dumps(report)) == report
    assert len(report["results"]) == 4 * 2            # SmolLM2's 4 weight shapes, 2 token counts
    for row in report["results"]:
        cusparselt = row["sparse"]["cusparselt"]
        assert row["dense_ms"] > 0 and cusparselt["ms"] > 0
        assert cusparselt["max_abs_error"] <= 1e-2 * cusparselt["max_abs_output"]
