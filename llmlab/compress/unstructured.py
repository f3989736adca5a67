"""Unstructured pruning: the weights that matter least become exact zeros, wherever they are.

Each linear layer inside the transformer blocks (q, k, v, o, gate, up, down) has a weight W of shape
(out, in). Pruning to sparsity s zeroes the fraction s of its entries with the lowest score:

    magnitude   $S_{ij} = |W_{ij}|$
    Wanda       $S_{ij} = |W_{ij}| \\cdot \\|X_j\\|_2$      (Sun et al. 2023, "A Simple and Effective
                                                          Pruning Approach for Large Language Models")

‖X_j‖₂ is input channel j's L2 norm over calibration tokens (llmlab.compress.calibration). Output i
is $y_i = \\sum_j W_{ij} x_j$, so removing W_ij changes it by |W_ij x_j|: Wanda weighs each weight by
what its input carries, magnitude assumes every input is the same size.

Which weights compete with which:

    magnitude, per layer    all of one matrix: each layer loses round(s · out · in) weights
    magnitude, global       all block linears together, one threshold: layers lose different fractions
    Wanda                   each output row on its own: every row loses round(s · in) weights, as in the
                            paper, which found comparing within an output better than within a layer

Global Wanda is not offered: ‖X_j‖ is in each layer's own input units (the residual stream grows with
depth; o and down read other activations than q and gate), so one threshold across layers would
compare unlike things. The embedding and the LM head are never pruned: in SmolLM2 they are one tied
matrix, so a zero in the head would also be a zero in a token's embedding; and the head's errors land
directly on the logits (the same reason llmlab.quant leaves them in full precision).

A mask is a bool tensor of the weight's shape, True where the weight is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LlmlabError
from ..options import check_sparsity
from .calibration import block_linears, calibration_ids, input_norms

# Tokens of a training play Wanda calibrates on. SmolLM2 at 50%, perplexity on 8k held-out tokens by
# calibration tokens: 512 -> 85.0, 2048 -> 80.7, 4096 -> 80.5, 16384 -> 78.8 (~8 s on 2 CPU cores).
CALIBRATION_TOKENS = 4096


def pruned_count(n_weights: int, sparsity: float) -> int:
    """How many of n_weights a sparsity prunes: the nearest whole number to sparsity · n_weights."""
    check_sparsity(sparsity)
    return round(sparsity * n_weights)


def keep_largest(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Mask of scores' shape: False at the n_pruned lowest scores along the last dim (in each row), True
    elsewhere. Exactly n_pruned per row even where scores tie (GGUF's Q4_1 weights take only 16 values
    per group of 32, so ties are common): a threshold alone would prune every tied weight."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_pruned:
        keep.scatter_(-1, scores.topk(n_pruned, dim=-1, largest=False).indices, False)
    return keep


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask pruning the fraction `sparsity` of the whole matrix with the smallest |W_ij|."""
    scores = weight.detach().abs().flatten()
    return keep_largest(scores, pruned_count(scores.numel(), sparsity)).view(weight.shape)


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| · ‖X_j‖₂ for weight (out, in) and input_norm (in,), in fp32."""
    if weight.dim() != 2 or input_norm.shape != (weight.shape[1],):
        raise LlmlabError(f"Wanda scores need a weight (out, in) and one input norm per input: got weight "
                          f"{tuple(weight.shape)} and input norms {tuple(input_norm.shape)}")
    return weight.detach().float().abs() * input_norm.float()[None, :]


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask pruning, in every output row, the fraction `sparsity` of its inputs with the lowest
    |W_ij| · ‖X_j‖₂."""
    return keep_largest(wanda_scores(weight, input_norm), pruned_count(weight.shape[1], sparsity))


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep masks pruning the fraction `sparsity` of all the weights together: the smallest |W_ij| of
    any layer go first, so each layer's own sparsity is whatever its weights' sizes make it."""
    scores = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    n_pruned = pruned_count(scores.numel(), sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_pruned:
        # kthvalue, not topk: topk would return half of a model's ~100M scores with their indices
        threshold = scores.kthvalue(n_pruned).values
        keep = scores > threshold
        # every score below the threshold goes; of those equal to it, the first ones in order, to make
        # the count exact
        tied = (scores == threshold).nonzero().squeeze(1)
        keep[tied[n_pruned - int((scores < threshold).sum()):]] = True
    parts = keep.split([w.numel() for w in weights.values()])
    return {name: part.view(w.shape) for (name, w), part in zip(weights.items(), parts)}


def calibration_norms(llm, n_tokens: int = CALIBRATION_TOKENS) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every block linear's inputs over n_tokens of a training play, read with llm's tokenizer."""
    if llm.tokenizer is None:
        raise LlmlabError(f"Wanda needs calibration text, and {llm.source} has no tokenizer to read it with; "
                          f"use magnitude pruning, or a model with a tokenizer")
    return input_norms(llm.model, calibration_ids(llm.tokenizer, n_tokens))


def float_weights(model) -> dict[str, torch.Tensor]:
    """Every block linear's weight by layer name, once each is known to be a float nn.Linear."""
    linears = block_linears(model)
    if not all(type(linear) is nn.Linear for linear in linears.values()):
        raise LlmlabError("prune float weights: load the model without weights=int8/fp8 and prune first "
                          "(load(sparsity=..., weights=...) does both, in that order)")
    return {name: linear.weight for name, linear in linears.items()}


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Zero, in place, every block linear weight outside its keep mask; layer name -> weights pruned.
    In a fused model the separate weights are views of the stacked q/k/v and gate/up matrices, so the
    fused matmuls see the zeros too."""
    linears = block_linears(model)
    for name, keep in masks.items():
        linears[name].weight.masked_fill_(~keep, 0.0)
    return {name: int((~keep).sum()) for name, keep in masks.items()}


def prune(llm, score: str = "wanda", sparsity: float = 0.5, scope: str = "layer",
          calibration_tokens: int = CALIBRATION_TOKENS) -> dict[str, int]:
    """Prune every block linear of a loaded LLM in place; layer name -> weights pruned.

    score: "magnitude" or "wanda" (calibrated on `calibration_tokens` of a training play);
    scope: "layer" (every layer to `sparsity`; Wanda row by row) or "global" (magnitude only).
    """
    check_sparsity(sparsity)
    if (score, scope) not in (("magnitude", "layer"), ("magnitude", "global"), ("wanda", "layer")):
        raise LlmlabError(f"prune score={score!r}, scope={scope!r}: choose magnitude per layer or global, or "
                          f"wanda per layer (Wanda's scores compare only within an output row)")
    weights = float_weights(llm.model)
    if score == "wanda":
        norms = calibration_norms(llm, calibration_tokens)
        masks = {name: wanda_mask(w, norms[name], sparsity) for name, w in weights.items()}
    elif scope == "global":
        masks = global_magnitude_masks(weights, sparsity)
    else:
        masks = {name: magnitude_mask(w, sparsity) for name, w in weights.items()}
    return apply_masks(llm.model, masks)
