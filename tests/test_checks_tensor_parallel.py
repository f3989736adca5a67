"""The checks of notebook 14 accept right answers and refuse wrong ones with a message that says what is wrong."""

import pytest
import torch

from llmlab.checks import CheckFailed
from llmlab.checks.tensor_parallel import check_parallel_linear, check_split


# --- right answers, written independently of the checks ------------------------------------------

def split(n, world, rank):
    sizes = [n // world + (r < n % world) for r in range(world)]
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def column_parallel(W, x, world):
    return [x @ W[split(W.shape[0], world, r).start:split(W.shape[0], world, r).stop].T for r in range(world)]


def row_parallel(W, x, world):
    shards = []
    for r in range(world):
        cols = split(W.shape[1], world, r)
        shards.append(x[:, cols.start:cols.stop] @ W[:, cols.start:cols.stop].T)
    return shards


# --- typical mistakes ----------------------------------------------------------------------------

def split_remainder_last(n, world, rank):
    size = n // world
    return range(rank * size, n if rank == world - 1 else (rank + 1) * size)


def row_parallel_equal_pieces(W, x, world):          # n // world columns each: the remainder is lost
    size = W.shape[1] // world
    return [x[:, r * size:(r + 1) * size] @ W[:, r * size:(r + 1) * size].T for r in range(world)]


def row_parallel_as_columns(W, x, world):            # slices the output instead of summing partials
    return column_parallel(W, x, world)


def column_parallel_whole(W, x, world):              # every rank computes everything
    return [x @ W.T for _ in range(world)]


def column_parallel_off_by_one(W, x, world):         # each rank's rows shifted by one
    shards = []
    for r in range(world):
        rows = split(W.shape[0], world, r)
        shards.append(x @ W[(rows.start + 1) % W.shape[0]:][:len(rows)].T if rows.stop < W.shape[0]
                      else x @ W[rows.start:rows.stop].T)
    return shards


def test_right_answers_pass(llm, capsys):
    check_split(split)
    check_parallel_linear(column_parallel, row_parallel, llm)
    out = capsys.readouterr().out
    assert out.count("Correct") == 2


def test_placeholders_say_what_to_fill_in(llm, capsys):
    check_split(lambda n, world, rank: None)
    check_parallel_linear(lambda W, x, world: None, lambda W, x, world: None, llm)
    out = capsys.readouterr().out
    assert "Fill in split" in out and "Fill in column_parallel" in out and "Fill in row_parallel" in out


def test_wrong_split_is_explained():
    with pytest.raises(CheckFailed, match="the extra items go to the first ranks|differ by at most one"):
        check_split(split_remainder_last)


@pytest.mark.parametrize("column, row, message", [
    (column_parallel, row_parallel_equal_pieces, r"row_parallel, world 5, rank 0: first wrong at token 0, .*extra columns"),
    (column_parallel, row_parallel_as_columns, "row-parallel gives every rank a partial sum of ALL output features"),
    (column_parallel_whole, row_parallel, "column-parallel gives each rank only its own output features"),
    (column_parallel_off_by_one, row_parallel, r"column_parallel, world 2, rank 0 .*: first wrong at token 0, output feature of the shard 0"),
])
def test_wrong_shards_are_located(llm, column, row, message):
    with pytest.raises(CheckFailed, match=message):
        check_parallel_linear(column, row, llm)
