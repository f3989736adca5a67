"""Checks for the exercises of notebooks/14_tensor_parallel.ipynb.

The expected ranges come from `llmlab.parallel.split`, the engine's own; the expected shards are the
real model's weights sliced the way a rank holds them, multiplied in fp32 by PyTorch. Each shard is
compared by the locator (`locate`), which names the rank, token and feature of the first difference;
then their sum or concatenation is compared with the whole layer's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import parallel
from . import check, unanswered
from .locate import Step, locate

# The joined or summed shards are the whole product with its terms added in another order: fp32
# rounding differs by a few units in the last place of the largest partial sums. 1e-5 of the output's
# scale is far above that (about 6e-8 relative per addition, up to 1,536 additions) and far below any
# real mistake (a missing or extra channel moves the output by about 1e-2 of its scale). Single shards
# are compared by `locate`, with its own fp32 tolerance (see locate.tolerance).
RELATIVE_TOL = 1e-5
WORLDS = (2, 3, 4, 5, 7)        # 5 and 7 do not divide 576 or 1536: the first ranks take one more item


@check
def check_split(split) -> None:
    """`split(n, world, rank) -> range`: rank's contiguous part of n items, as `llmlab.parallel.split`."""
    if unanswered(split(9, 2, 0), "split"):
        return
    cases = [(n, world) for n in (0, 1, 2, 3, 5, 8, 9, 32, 1536, 49152) for world in (1, 2, 3, 4, 7, 8)]
    for n, world in cases:
        parts = [split(n, world, rank) for rank in range(world)]
        assert all(isinstance(p, range) for p in parts), f"split({n}, {world}, rank) should return a range"
        assert [i for p in parts for i in p] == list(range(n)), (
            f"split({n}, {world}, ·): the ranks' ranges, in rank order, should cover 0..{n - 1} once each, "
            f"without gaps")
        assert max(map(len, parts)) - min(map(len, parts)) <= 1, f"split({n}, {world}, ·): sizes may differ by at most one"
        for rank in range(world):
            assert parts[rank] == parallel.split(n, world, rank), (
                f"split({n}, {world}, {rank}) = {parts[rank]}: the extra items go to the first ranks")
    print(f"Correct: the same ranges as llmlab.parallel.split in all {len(cases)} cases.")


def _as_shards(got, world: int, name: str) -> list[torch.Tensor]:
    assert got is not None, f"{name} returned None: return a list of {world} tensors, one per rank"
    got = list(got)
    assert len(got) == world, f"{name}(W, x, world={world}) returned {len(got)} tensors: one per rank, {world}"
    assert all(isinstance(t, torch.Tensor) for t in got), f"{name}: every shard is a torch.Tensor"
    return got


def _real_inputs(llm, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer `layer`'s W_up and W_down, a real MLP input h (tokens, dim) and the activation a (tokens, ffn)."""
    mlp, norm = llm.model.layers[layer].mlp, llm.model.layers[layer].mlp_norm
    ids = llm.tokenizer.encode("Each rank holds a slice of every matrix and computes its part of the answer.")
    with torch.inference_mode():
        h = norm(llm.model.embed(torch.tensor(ids)))                         # (tokens, dim)
        a = F.silu(h @ mlp.w_gate.weight.T) * (h @ mlp.w_up.weight.T)       # (tokens, ffn_dim)
    return mlp.w_up.weight.detach(), mlp.w_down.weight.detach(), h, a


@check
def check_parallel_linear(column_parallel, row_parallel, llm, layer: int = 5) -> None:
    """`column_parallel(W, x, world)`: W (out, in), x (tokens, in) -> `world` tensors, rank r's (tokens, len(rows_r))
    block of x Wᵀ from W's rows parallel.split(out, world, r). `row_parallel(W, x, world)` -> `world` tensors
    (tokens, out), rank r's partial product from W's columns and x's features parallel.split(in, world, r).
    Checked on the real W_up and W_down of one layer and real inputs, shard by shard, then summed or joined."""
    w_up, w_down, h, a = _real_inputs(llm, layer)
    blank_column = unanswered(column_parallel(w_up, h, 2), "column_parallel")
    blank_row = unanswered(row_parallel(w_down, a, 2), "row_parallel")
    if blank_column or blank_row:
        return
    whole_up, whole_down = h @ w_up.T, a @ w_down.T                          # one process: (tokens, ffn), (tokens, dim)
    for world in WORLDS:
        tolerance = RELATIVE_TOL * whole_up.abs().max().item()
        shards = _as_shards(column_parallel(w_up, h, world), world, "column_parallel")
        for rank, shard in enumerate(shards):
            rows = parallel.split(w_up.shape[0], world, rank)
            want = h @ w_up[rows.start:rows.stop].T
            if shard.shape == whole_up.shape:
                raise AssertionError(
                    f"column_parallel, world {world}, rank {rank}: a shard of the whole output's shape "
                    f"{tuple(whole_up.shape)}; column-parallel gives each rank only its own output features, "
                    f"(tokens, {len(rows)}) from W's rows {rows.start}..{rows.stop - 1}")
            assert shard.shape == want.shape, (
                f"column_parallel, world {world}, rank {rank}: shape {tuple(shard.shape)}, expected "
                f"{tuple(want.shape)}: rank {rank} holds W's rows parallel.split({w_up.shape[0]}, {world}, {rank}) "
                f"= {rows.start}..{rows.stop - 1}" + (" (the first ranks take the extra rows)"
                                                       if w_up.shape[0] % world else ""))
            locate([Step(f"column_parallel, world {world}, rank {rank} (W's rows {rows.start}..{rows.stop - 1})",
                         got=shard, expected=want, dims=("token", "output feature of the shard"),
                         hint="A rank multiplies the whole input x by its own rows of W.")])
        joined = torch.cat(shards, dim=-1)
        assert (joined - whole_up).abs().max().item() <= tolerance, (
            f"column_parallel, world {world}: the shards side by side are not x Wᵀ")
    for world in WORLDS:
        tolerance = RELATIVE_TOL * whole_down.abs().max().item()
        shards = _as_shards(row_parallel(w_down, a, world), world, "row_parallel")
        for rank, shard in enumerate(shards):
            cols = parallel.split(w_down.shape[1], world, rank)
            if shard.shape != whole_down.shape:
                raise AssertionError(
                    f"row_parallel, world {world}, rank {rank}: shape {tuple(shard.shape)}, expected "
                    f"{tuple(whole_down.shape)}, the whole output's: row-parallel gives every rank a partial sum of "
                    f"ALL output features, from W's columns {cols.start}..{cols.stop - 1} and the same features of x")
            want = a[:, cols.start:cols.stop] @ w_down[:, cols.start:cols.stop].T
            locate([Step(f"row_parallel, world {world}, rank {rank}", got=shard, expected=want,
                         dims=("token", "output feature"),
                         hint=f"Rank {rank}'s term is x[:, {cols.start}:{cols.stop}] times W[:, {cols.start}:{cols.stop}]ᵀ"
                              + (" (the first ranks take the extra columns)." if w_down.shape[1] % world else "."))])
        total = torch.stack(shards).sum(0)                                   # what the all-reduce computes
        assert (total - whole_down).abs().max().item() <= tolerance, (
            f"row_parallel, world {world}: the shards' sum is not x Wᵀ")
    print(f"Correct: on layer {layer}'s real W_up ({w_up.shape[0]}×{w_up.shape[1]}) and W_down "
          f"({w_down.shape[0]}×{w_down.shape[1]}), for {len(WORLDS)} world sizes (uneven ones too), every shard is "
          f"its rank's part: joined, the column-parallel shards are x W_upᵀ; summed (the all-reduce), the "
          f"row-parallel ones are x W_downᵀ, within {RELATIVE_TOL:g} of the output's scale.")
