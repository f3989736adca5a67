"""Checks on a model file's weights before they are trusted: the names and shapes its config implies,
and no NaN or inf. A file that fails them would load and then answer wrongly, or crash mid-generation."""

from __future__ import annotations

import numpy as np
import torch

from .config import ModelConfig, shown
from .errors import LlmlabError

WEIGHTS_PER_LAYER = 9      # two norms, four attention projections, three MLP projections


def check_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, source, file_names: dict[str, str]) -> None:
    """shapes: llmlab name -> shape as stored; file_names: llmlab name -> the name in the file."""
    if WEIGHTS_PER_LAYER * config.n_layers > len(shapes):     # before listing n_layers' worth of names
        raise LlmlabError(f"{source}: the config gives {config.n_layers:,} layers, but the file holds only "
                          f"{len(shapes):,} weights, and each layer has {WEIGHTS_PER_LAYER}")
    expected = config.weight_shapes()
    missing = [name for name in expected if name not in shapes]
    unexpected = [file_names[name] for name in shapes if name not in expected]
    if missing or unexpected:
        raise LlmlabError(f"{source}: the weights do not match the config ({config.n_layers} layers, "
                          f"tie_embeddings={config.tie_embeddings}): missing [{', '.join(map(shown, missing[:5]))}] "
                          f"(llmlab's names), unexpected [{', '.join(map(shown, unexpected[:5]))}]")
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise LlmlabError(
                f"{source}: weight {shown(file_names[name])} has shape {tuple(shape)}, but the config implies "
                f"{expected[name]} (vocab_size={config.vocab_size}, dim={config.dim}, head_dim={config.head_dim}, "
                f"ffn_dim={config.ffn_dim}): the file's weights and its config disagree")


def check_finite(name: str, w: np.ndarray | torch.Tensor, source) -> None:
    """Refuse NaN and inf anywhere in a weight: one NaN in a norm turns every output into NaN."""
    w = torch.as_tensor(w)
    # one reduction rather than an isfinite pass, which is ~30x slower on CPU: any NaN or inf makes
    # the sum NaN or inf (and should huge finite weights overflow it, the exact count below decides)
    if not w.is_floating_point() or torch.isfinite(w.sum(dtype=torch.float32)):
        return
    n_nan, n_inf = int(w.isnan().sum()), int(w.isinf().sum())
    if n_nan or n_inf:
        raise LlmlabError(f"{source}: weight {shown(name)} holds {n_nan:,} NaN and {n_inf:,} infinite values: "
                          f"the file is corrupt")
