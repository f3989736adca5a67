"""Structured pruning: whole MLP channels and whole attention heads removed, so that the model is
physically smaller (narrower matrices, a smaller KV cache) and faster on any hardware, unlike exact
zeros scattered through full-size matrices (llmlab.compress.unstructured).

What goes, layer by layer:

    MLP channel j    row j of W_gate and W_up, column j of W_down: one hidden unit of the SwiGLU
    query head h     its head_dim rows of W_q and columns of W_o
    KV head g        its rows of W_k and W_v, taken out with every query head it serves

Which go: the least important by an activation-aware score. Over calibration tokens t, channel j of
a linear layer's input adds x_{t,j} W_{:,j} to its output; the size of everything it adds is

    $s_j = \\|X_j\\|_2 \\, \\|W_{:,j}\\|_2$

(the Frobenius norm of the rank-one matrix X_j W_{:,j}^T), Wanda's ‖X_j‖ weighing the whole column.
An MLP channel is scored on W_down's inputs, a query head on the head_dim inputs of W_o that carry
its output, as the root of the sum of their s_j^2 (which would be the head's own Frobenius norm if
its channels added orthogonal vectors); a KV head scores the same over the query heads it serves.

Grouped-query attention stays valid by one rule: every KV head of a layer keeps the same number of
query heads. SmolLM2 has 9 query heads in 3 KV groups of 3; heads_keep=2/3 keeps the best 2 of each
group (6 heads, 3 KV heads), kv_heads_keep=2/3 removes the weakest whole group (6 heads, 2 KV heads,
a third less KV cache). Kept heads are laid out group by group, so query head h still reads KV head
h // (heads per group), as attention.py's repeat_interleave expects.

The fractions kept are per model (a float) or per layer (a sequence of n_layers floats), and a layer
keeps at least one channel and one head. `mask_structures` zeroes the same weights in the full-size
model instead: the same function, computed the slow way, which the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import LlmlabError
from ..llm import LLM, model_from_state_dict
from .calibration import calibration_ids, input_norms

CALIBRATION_TOKENS = 2048


@dataclass(frozen=True)
class LayerKeep:
    """What one layer keeps, as sorted indices into the full layer: MLP channels, query heads
    (grouped by KV head) and KV heads."""

    channels: torch.Tensor
    heads: torch.Tensor
    kv_heads: torch.Tensor


def channel_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """s_j = ‖X_j‖ ‖W_:,j‖ for every input channel j of a linear layer: (in_features,)."""
    return input_norm.float() * weight.detach().float().norm(dim=0)


def _fraction(keep: float | Sequence[float], layer: int, n_layers: int, name: str) -> float:
    fractions = [keep] * n_layers if isinstance(keep, (int, float)) else list(keep)
    if len(fractions) != n_layers:
        raise LlmlabError(f"{name} has {len(fractions)} fractions for {n_layers} layers: give one float, "
                          f"or one per layer")
    if not all(0 < f <= 1 for f in fractions):
        raise LlmlabError(f"{name} must be fractions kept, in (0, 1]; got {keep}")
    return fractions[layer]


def _top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the round(fraction * n) highest scores (at least one), sorted."""
    k = max(1, round(fraction * len(scores)))
    return scores.topk(k).indices.sort().values


def choose_kept(model, norms: dict[str, torch.Tensor], mlp_keep: float | Sequence[float] = 1.0,
                heads_keep: float | Sequence[float] = 1.0,
                kv_heads_keep: float | Sequence[float] = 1.0) -> list[LayerKeep]:
    """What each layer keeps, by the scores above. norms: input_norms(model, calibration ids).
    mlp_keep: fraction of MLP channels kept; heads_keep: fraction of each KV head's query heads kept;
    kv_heads_keep: fraction of KV heads kept (each removed with its query heads)."""
    n_layers, kept = len(model.layers), []
    for i, block in enumerate(model.layers):
        attention, mlp = block.attention, block.mlp
        channels = _top(channel_scores(mlp.w_down.weight, norms[f"layers.{i}.mlp.w_down"]),
                        _fraction(mlp_keep, i, n_layers, "mlp_keep"))
        per_channel = channel_scores(attention.wo.weight, norms[f"layers.{i}.attention.wo"])
        head_scores = per_channel.view(attention.n_heads, attention.head_dim).norm(dim=1)
        groups = head_scores.view(attention.n_kv_heads, -1)        # (kv_heads, query heads per KV head)
        kv_heads = _top(groups.norm(dim=1), _fraction(kv_heads_keep, i, n_layers, "kv_heads_keep"))
        per_group = max(1, round(_fraction(heads_keep, i, n_layers, "heads_keep") * groups.shape[1]))
        # the best per_group query heads of every kept KV head, as indices into the full layer
        best = groups[kv_heads].topk(per_group, dim=1).indices.sort(dim=1).values
        heads = (kv_heads[:, None] * groups.shape[1] + best).flatten()
        kept.append(LayerKeep(channels, heads, kv_heads))
    return kept


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of W_q (or W_k, W_v; the columns of W_o) that belong to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _rebuild(llm: LLM, config, state: dict) -> LLM:
    """An LLM from new weights, with the original's tokenizer and switches (fused, attention, kernels)."""
    if config.tie_embeddings:
        state.pop("head.weight")
    model = model_from_state_dict(config, state, llm.dtype, llm.device)
    model.fuse_projections(llm.options.fused)
    model.set_attention(llm.options.attention)
    model.set_kernels(llm.options.kernels)
    return LLM(model, llm.tokenizer, llm.source, llm.options)


def _slices(kept: LayerKeep, head_dim: int) -> dict[str, tuple[int, torch.Tensor]]:
    """Weight name within a block -> (dimension, indices kept along it)."""
    q, kv = _head_rows(kept.heads, head_dim), _head_rows(kept.kv_heads, head_dim)
    return {"attention.wq.weight": (0, q), "attention.wk.weight": (0, kv), "attention.wv.weight": (0, kv),
            "attention.wo.weight": (1, q), "mlp.w_gate.weight": (0, kept.channels),
            "mlp.w_up.weight": (0, kept.channels), "mlp.w_down.weight": (1, kept.channels)}


def _copied_state(llm: LLM) -> dict[str, torch.Tensor]:
    """The weights, copied: the new model shares nothing with the original, and (made outside
    inference mode) can be trained further, as distillation does."""
    return {name: w.clone() for name, w in llm.model.state_dict().items()}


def remove_structures(llm: LLM, kept: list[LayerKeep]) -> LLM:
    """A new, physically smaller LLM: each layer's weights cut to what `kept` keeps, and a config
    with the per-layer widths. The original is left as it was."""
    config, state = llm.config, _copied_state(llm)
    for i, layer in enumerate(kept):
        for name, (dim, index) in _slices(layer, config.head_dim).items():
            key = f"layers.{i}.{name}"
            state[key] = state[key].index_select(dim, index.to(state[key].device))
    smaller = replace(config, layer_ffn_dims=tuple(len(k.channels) for k in kept),
                      layer_heads=tuple(len(k.heads) for k in kept),
                      layer_kv_heads=tuple(len(k.kv_heads) for k in kept))
    return _rebuild(llm, smaller, state)


def mask_structures(llm: LLM, kept: list[LayerKeep]) -> LLM:
    """A new LLM of the original size whose removed channels and heads are zeroed instead: rows of
    W_gate, W_up, W_q, W_k, W_v and columns of W_down, W_o. It computes what remove_structures's
    model computes (a zeroed W_down or W_o column adds nothing), with every matrix still full size."""
    config, state = llm.config, _copied_state(llm)
    for i, layer in enumerate(kept):
        for name, (dim, index) in _slices(layer, config.head_dim).items():
            w = state[f"layers.{i}.{name}"]
            removed = torch.ones(w.shape[dim], dtype=torch.bool, device=w.device)
            removed[index.to(w.device)] = False
            w.index_fill_(dim, removed.nonzero().flatten(), 0.0)
    return _rebuild(llm, config, state)


def prune_structured(llm: LLM, mlp_keep: float | Sequence[float] = 1.0, heads_keep: float | Sequence[float] = 1.0,
                     kv_heads_keep: float | Sequence[float] = 1.0, ids: list[int] | None = None) -> LLM:
    """Calibrate on `ids` (default: CALIBRATION_TOKENS tokens of a training play), choose what each
    layer keeps, and return the physically smaller model. E.g. mlp_keep=0.5, heads_keep=2/3 keeps
    half the MLP channels and 6 of SmolLM2's 9 query heads in every layer."""
    if ids is None:
        ids = calibration_ids(llm._require_tokenizer(), CALIBRATION_TOKENS)
    kept = choose_kept(llm.model, input_norms(llm.model, ids), mlp_keep, heads_keep, kv_heads_keep)
    return remove_structures(llm, kept)
