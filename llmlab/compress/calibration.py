"""Calibration: what the real model's linear layers see on real text.

Wanda, and the structured pruner's channel scores, weigh each weight W_ij by the size of its input
channel j over the calibration tokens t:

    $\\|X_j\\|_2 = \\sqrt{\\sum_t x_{t,j}^2}$

A small weight on a channel that carries large activations (the outlier channels of notebook 09) can
matter more than a large weight on a quiet one; magnitude pruning cannot see that, Wanda can.

The calibration text is read from the training plays (llmlab.corpus.training_plays), never from the
held-out plays the quality scores are computed on.
"""

from __future__ import annotations

import torch
from torch import nn

from ..corpus import play_text, training_plays
from ..errors import LlmlabError

CALIBRATION_PLAY = "hamlet_gut.txt"


def calibration_ids(tokenizer, n_tokens: int = 4096, play: str = CALIBRATION_PLAY) -> list[int]:
    """n_tokens token ids from one training play (Hamlet by default)."""
    if play not in training_plays():
        raise LlmlabError(f"{play!r} is not a training play: calibrate on one of llmlab.corpus.training_plays(), "
                          f"so that the held-out plays stay unseen")
    ids = tokenizer.encode(play_text(play))
    if len(ids) < n_tokens:
        raise LlmlabError(f"{play} gives {len(ids):,} tokens, fewer than the {n_tokens:,} asked for")
    return ids[:n_tokens]


def block_linears(model) -> dict[str, nn.Linear]:
    """Every linear layer inside the transformer blocks, by its state-dict name (layers.3.mlp.w_up);
    the embedding and the LM head are not pruned."""
    return {f"layers.{name}": module for name, module in model.layers.named_modules()
            if hasattr(module, "in_features")}


def input_norms(model, ids: list[int], chunk: int = 512) -> dict[str, torch.Tensor]:
    """Linear layer name -> (in_features,) fp32 tensor of ‖X_j‖₂, every input channel's L2 norm over
    the calibration tokens. The text is run in chunks of `chunk` tokens (each its own context), through
    the separate projections: fused ones would hide q/k/v's and gate/up's inputs behind one matmul."""
    linears = block_linears(model)
    if not all(type(linear) is nn.Linear for linear in linears.values()):
        raise LlmlabError("calibrate a model with plain nn.Linear weights: load it without weights=int8/int4/fp8")
    squares = {name: torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)
               for name, linear in linears.items()}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            squares[name] += x.pow(2).sum(0)
        return hook

    fused = model.layers[0].attention.wqkv is not None
    model.fuse_projections(False)
    handles = [linear.register_forward_hook(record(name)) for name, linear in linears.items()]
    try:
        # inference mode for the forward passes only: weights re-stacked inside it would become
        # inference tensors that no later in-place change (pruning's zeros) may touch
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=model.embed.weight.device)
            for start in range(0, len(ids), chunk):
                model(tokens[:, start:start + chunk])
    finally:
        for handle in handles:
            handle.remove()
        model.fuse_projections(fused)
    return {name: total.sqrt() for name, total in squares.items()}
