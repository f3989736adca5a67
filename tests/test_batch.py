"""One forward pass over several sequences (llmlab.serve.batch) against each sequence run alone.

The reference is the plain eager path: `model(tokens, start_pos=int, cache=KVCache)`, one sequence at
a time, which shares no code with the batch's RoPE positions, slot writes, block gathers and mask.
Pools have their free blocks shuffled, so block tables are neither contiguous nor in order.

Tolerances (fp32, CPU). The batch multiplies a (1, T, dim) row where the sequence alone multiplies
(1, n, dim): the same dot products, but a matmul of another row count may block and sum in another
order, and the batch's attention runs SDPA under a mask over a padded context where the eager path
runs it unmasked. Each changes a value by a few fp32 roundings (~1e-7 relative), which 30 layers
carry to the logits (size 20 to 35). Measured max |logit difference|: 3.9e-5 in the mixed step,
3.5e-5 with shared prefix blocks, 5.0e-5 over other chunk splits of these prompts (the eager path
itself differs from its own one-shot forward of the prompt by up to 4.4e-5, for the same reason);
we allow LOGIT_TOL = 2e-4, four times the largest. The keys and values stored in the pool differ from
the eager cache's by at most 2.1e-5 (values up to 21): KV_TOL = 1e-4. A real mistake (a wrong
position, a slot off by one, a token seeing another sequence's or a stale key) moves logits by 0.1 to
hundreds and fails either bound.
"""

import random

import pytest
import torch

from llmlab.config import preset
from llmlab.errors import LlmlabError
from llmlab.kv_cache import BlockPool, KVCache
from llmlab.model import Transformer, triton_kernel
from llmlab.serve.batch import PagedBatch, SequenceChunk, forward_batch

LOGIT_TOL = 2e-4
KV_TOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"      # where the kernel tests run: Triton's interpreter on CPU
TEXTS = ["The capital of France is",                                  # 5 tokens
         "Once upon a time, in a land far away, there lived a",       # 14
         "def fibonacci(n):\n    if n < 2:",                          # 13
         "1 + 1 = 2, 2 + 2 = 4, 3 + 3 ="]                             # 23


def scrambled_pool(config, n_blocks: int, block_size: int, seed: int = 0, device="cpu") -> BlockPool:
    """A pool as a server's looks after a while: blocks handed out in no order, and every slot holding
    stale keys and values of sequences long gone (random, of a real cache's size), which a sequence must
    never see. The same seed gives the same pool."""
    pool = BlockPool(config, n_blocks, block_size, device=device)
    random.Random(seed).shuffle(pool.free_blocks)
    generator = torch.Generator().manual_seed(seed)
    for layer_pool in pool.k + pool.v:
        layer_pool.copy_(torch.randn(layer_pool.shape, generator=generator) * 10)
    return pool


def blocks_for(pool: BlockPool, n_tokens: int) -> list[int]:
    return [pool.allocate() for _ in range(-(-n_tokens // pool.block_size))]


@torch.inference_mode()
def alone(model, ids: list[int], start: int):
    """The plain path, one sequence: ids[:start] as a prefill, then ids[start:] from start_pos=start.
    Returns the last token's logits (vocab,) and the KVCache holding all of ids."""
    device = model.embed.weight.device
    cache = KVCache(model.config, len(ids), device=device)
    if start:
        model(torch.tensor([ids[:start]], device=device), start_pos=0, cache=cache, last_only=True)
    return model(torch.tensor([ids[start:]], device=device), start_pos=start, cache=cache, last_only=True)[0, -1], cache


def paged_attention():
    """llmlab.kernels.paged_attention (imported after llmlab, which sets TRITON_INTERPRET without a GPU),
    or a skip where Triton is not installed."""
    pytest.importorskip("triton")
    return triton_kernel("paged_attention")


def in_position_order(layer_pool: torch.Tensor, table: list[int], n_tokens: int) -> torch.Tensor:
    """A sequence's keys (or values) as stored: its blocks in table order, its first n_tokens positions."""
    return layer_pool[:, table].flatten(1, 2)[:, :n_tokens]                  # (kv_heads, n_tokens, head_dim)


@pytest.fixture(scope="module")
def mixed_step(llm):
    """Two steps over four sequences. The first fills what the second finds cached: 8 prompt tokens of
    sequence 1, all but the last token of sequences 2 and 3. The second, the step checked, runs in ONE
    forward: sequence 0's whole prompt (it just arrived), sequence 1's next chunk after its 8 cached
    tokens, and one decode each for sequences 2 and 3."""
    ids = [llm.tokenizer.encode(text) for text in TEXTS]
    pool = scrambled_pool(llm.config, 40, 4)
    tables = [blocks_for(pool, len(x)) for x in ids]
    forward_batch(llm.model, pool, [SequenceChunk(tables[1], 0, ids[1][:8]),
                                    SequenceChunk(tables[2], 0, ids[2][:-1]),
                                    SequenceChunk(tables[3], 0, ids[3][:-1])])
    step = [SequenceChunk(tables[0], 0, ids[0]), SequenceChunk(tables[1], 8, ids[1][8:]),
            SequenceChunk(tables[2], len(ids[2]) - 1, ids[2][-1:]),
            SequenceChunk(tables[3], len(ids[3]) - 1, ids[3][-1:])]
    return ids, pool, step, forward_batch(llm.model, pool, step)


def test_a_mixed_step_gives_each_sequence_its_own_logits(llm, mixed_step):
    ids, _, step, logits = mixed_step
    assert logits.shape == (4, llm.config.vocab_size)
    for i, chunk in enumerate(step):
        reference, _ = alone(llm.model, ids[i], chunk.start_pos)
        diff = (logits[i] - reference).abs().max().item()
        assert diff <= LOGIT_TOL, f"sequence {i}: max |logit difference| {diff:.2e}"
        assert logits[i].argmax() == reference.argmax()


def test_keys_and_values_land_in_each_sequences_own_slots(llm, mixed_step):
    ids, pool, step, _ = mixed_step
    stale, written = scrambled_pool(llm.config, 40, 4), torch.zeros(pool.n_blocks, pool.block_size, dtype=torch.bool)
    for i, chunk in enumerate(step):
        _, cache = alone(llm.model, ids[i], chunk.start_pos)
        n = len(ids[i])
        for layer in range(llm.config.n_layers):
            for stored, reference in ((pool.k, cache.keys), (pool.v, cache.values)):
                got = in_position_order(stored[layer], chunk.block_table, n)
                torch.testing.assert_close(got, reference[layer][0, :, :n], rtol=0, atol=KV_TOL)
        for position in range(n):
            written[chunk.block_table[position // pool.block_size], position % pool.block_size] = True
    for layer in range(llm.config.n_layers):           # and nothing anywhere else
        assert torch.equal(pool.k[layer][:, ~written], stale.k[layer][:, ~written])
        assert torch.equal(pool.v[layer][:, ~written], stale.v[layer][:, ~written])


def test_greedy_tokens_of_a_continuous_batch_match_each_sequence_alone(llm):
    """A tiny scheduler: sequence i arrives at step i; each step a sequence runs its next prompt chunk
    of up to 8 tokens, or decodes its last token; it leaves after 17 new tokens (the prompt's logits
    give the first, 16 decode steps the rest), freeing its blocks."""
    prompts = [llm.tokenizer.encode(text) for text in TEXTS]
    expected = [list(llm.generate_ids(p, 17, stop_ids=set())) for p in prompts]
    pool = scrambled_pool(llm.config, 48, 4)
    ids, done, tables, new = [list(p) for p in prompts], [0] * 4, [[] for _ in prompts], [[] for _ in prompts]
    for step in range(40):
        running = [i for i in range(min(step + 1, 4)) if len(new[i]) < 17]
        if not running:
            break
        chunks = []
        for i in running:
            todo = ids[i][done[i]:done[i] + 8]
            tables[i] += blocks_for(pool, done[i] + len(todo) - len(tables[i]) * pool.block_size)
            chunks.append(SequenceChunk(tables[i], done[i], todo))
        for i, chunk, logits in zip(running, chunks, forward_batch(llm.model, pool, chunks)):
            done[i] += len(chunk.tokens)
            if done[i] == len(ids[i]):                  # the prompt is all in: these logits pick the next token
                ids[i].append(int(logits.argmax()))
                new[i].append(ids[i][-1])
                if len(new[i]) == 17:
                    pool.release(tables[i])
    assert new == expected
    assert len(pool.free_blocks) == pool.n_blocks


def test_a_second_sequence_reads_the_first_ones_prefix_blocks(llm):
    """As the prefix cache hands them out: sequence b's table starts with a's two full blocks, and b runs
    only its own suffix, beside a's next decode."""
    tok = llm.tokenizer
    a = tok.encode("In the beginning of the story, the old sailor told the children about the sea and its monsters.")
    b = a[:8] + tok.encode(" that the king had lost his crown.")
    pool = scrambled_pool(llm.config, 16, 4, seed=1)
    table_a = blocks_for(pool, len(a) + 1)
    first = forward_batch(llm.model, pool, [SequenceChunk(table_a, 0, a)])[0]
    a.append(int(first.argmax()))
    shared = [(pool.k[layer][:, table_a[:2]].clone(), pool.v[layer][:, table_a[:2]].clone())
              for layer in range(llm.config.n_layers)]
    table_b = table_a[:2] + blocks_for(pool, len(b) - 8)
    logits = forward_batch(llm.model, pool, [SequenceChunk(table_a, len(a) - 1, a[-1:]),
                                             SequenceChunk(table_b, 8, b[8:])])
    for layer, (k, v) in enumerate(shared):             # read, never written
        assert torch.equal(pool.k[layer][:, table_a[:2]], k) and torch.equal(pool.v[layer][:, table_a[:2]], v)
    for got, (ids, start) in zip(logits, [(a, len(a) - 1), (b, 8)]):
        reference, _ = alone(llm.model, ids, start)
        assert (got - reference).abs().max().item() <= LOGIT_TOL


@pytest.fixture(scope="module")
def pruned():
    """Random weights, three layers of different widths as structured pruning leaves them: 9 query
    heads over 3 KV heads, 6 over 2, 4 over 1."""
    torch.manual_seed(0)
    config = preset("smollm2-135m", n_layers=3, vocab_size=512, layer_heads=(9, 6, 4), layer_kv_heads=(3, 2, 1))
    return Transformer(config).eval().to(DEVICE)


def test_layers_of_different_widths_and_the_decode_kernel(pruned, monkeypatch):
    """A mixed step, then a decode-only step through the PyTorch path (the written-out maths) and through
    the Triton kernel, each against the sequences alone. The kernel is asked for on CPU (it runs in
    Triton's interpreter); on a GPU the default "sdpa" must pick it. Random logits are ~500, so the
    bound is relative to the largest: measured 2.1e-7 on CPU, allowed 1e-6."""
    kernels, launches = paged_attention(), []
    launch = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention",
                        lambda q, pool_k, *rest: launches.append(pool_k.shape[0]) or launch(q, pool_k, *rest))
    lengths = [5, 11, 1]
    ids = [torch.randint(512, (n + 1,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    pool = scrambled_pool(pruned.config, 24, 4, device=DEVICE)
    tables = [blocks_for(pool, len(x)) for x in ids]
    forward_batch(pruned, pool, [SequenceChunk(t, 0, x[:-1]) for t, x in zip(tables, ids)])
    decodes = [SequenceChunk(t, len(x) - 1, x[-1:]) for t, x in zip(tables, ids)]
    try:
        pruned.set_attention("naive")
        torch_path = forward_batch(pruned, pool, decodes)
        pruned.set_attention("sdpa" if DEVICE == "cuda" else "triton")
        kernel = forward_batch(pruned, pool, decodes)
    finally:
        pruned.set_attention("sdpa")
    assert launches == [3, 2, 1]                  # the kernel ran once a layer, with that layer's KV heads
    for i, x in enumerate(ids):
        reference, _ = alone(pruned, x, len(x) - 1)
        assert error_of_largest(torch_path[i], reference) <= 1e-6
        assert error_of_largest(kernel[i], reference) <= 1e-6


def random_paged_batch(config, block_size: int, lengths: list[int], device="cpu") -> PagedBatch:
    """Random keys and values in a pool; one decoding sequence per length, its blocks scattered."""
    pool = BlockPool(config, sum(-(-n // block_size) for n in lengths) + 3, block_size, device=device)
    for t in pool.k + pool.v:
        t.normal_()
    order = torch.randperm(pool.n_blocks).tolist()
    chunks = []
    for n in lengths:
        table, order = order[:-(-n // block_size)], order[-(-n // block_size):]
        chunks.append(SequenceChunk(table, n - 1, [0]))
    return PagedBatch(config, pool, chunks, device)


def error_of_largest(actual, expected) -> float:
    """Largest error as a share of the largest output (for low precision, as tests/test_kernels.py)."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def kernel_against_the_torch_path(batch: PagedBatch, q: torch.Tensor, tol: float) -> torch.Tensor:
    """The kernel's output, checked against the PyTorch path ("naive" gathers the blocks on any device)
    and against the kernel file's reference, which attends one sequence at a time."""
    pool_k, pool_v = batch.pool.k[0].to(q.dtype), batch.pool.v[0].to(q.dtype)
    kernel = batch.attend(q, pool_k, pool_v, "triton")
    assert error_of_largest(kernel, batch.attend(q, pool_k, pool_v, "naive")) <= tol
    one_by_one = paged_attention().paged_decode_attention_reference(
        q[0].transpose(0, 1), pool_k, pool_v, batch.block_tables, batch.context_lens)
    assert error_of_largest(kernel, one_by_one.transpose(0, 1)[None]) <= tol
    return kernel


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_decode_kernel_matches_the_torch_path(dtype, tol, block_size):
    """Lengths 1 (one key), 37 (a ragged last block and tile), 5 full blocks, 70 (two 64-key tiles).
    fp32: only the order of the sums differs (measured 1.3e-7 of the largest output). fp16: inputs and
    probabilities rounded to 11 bits (5e-4 each), as tests/test_kernels.py allows."""
    torch.manual_seed(0)
    batch = random_paged_batch(preset("smollm2-135m", n_layers=1), block_size, [1, 37, 5 * block_size, 70], DEVICE)
    q = torch.randn(1, 9, 4, 64, device=DEVICE).to(dtype)    # 4 sequences, one new token each; 9 heads over 3
    kernel_against_the_torch_path(batch, q, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2)])
def test_gpu_paged_decode_kernel(dtype, tol):
    """Natively, at a model's shapes: 16 sequences up to 3000 tokens, 32 query heads over 8, head_dim 128."""
    torch.manual_seed(0)
    batch = random_paged_batch(preset("llama-3-8b", n_layers=1), 16, torch.randint(1, 3000, (16,)).tolist(), "cuda")
    q = torch.randn(1, 32, 16, 128, device="cuda", dtype=dtype)
    kernel = kernel_against_the_torch_path(batch, q, tol)
    pool_k, pool_v = batch.pool.k[0].to(dtype), batch.pool.v[0].to(dtype)
    assert torch.equal(batch.attend(q, pool_k, pool_v, "sdpa"), kernel)   # on a GPU "sdpa" takes the kernel too


TINY = preset("smollm2-135m", n_layers=1, vocab_size=64)
BAD_STEPS = {
    "the batch is empty": [],
    "sequence 0 has no new tokens": [SequenceChunk([0], 0, [])],
    r"sequence 1's block table has 1 blocks of 4 tokens, room for 4 positions, but its tokens reach position 4: "
    r"give it 1 more": [SequenceChunk([0], 0, [1]), SequenceChunk([1], 3, [1, 2])],
    "sequence 0 reaches position 8192, past the model's context of 8192 tokens": [SequenceChunk([0], 8190, [1, 2, 3])],
    r"sequence 0's block table names block 9, but the pool's blocks are 0 \.\. 7": [SequenceChunk([9], 0, [1])],
    "sequence 0 has start_pos -1": [SequenceChunk([0], -1, [1])],
    r"sequence 0: token id 64 is outside the vocabulary \(0\.\.63\)": [SequenceChunk([0], 0, [64])],
    "two sequences of the step write their keys into the same slot": [SequenceChunk([0, 1], 4, [1]),
                                                                       SequenceChunk([2, 1], 4, [1])],
}


@pytest.mark.bad_input(kind="a batched step that cannot run (empty, no tokens, block table too short, past the "
                            "context, a block outside the pool, a negative start, a bad token, two writers of one slot)",
                       gets="LlmlabError naming the sequence and what to give it")
@pytest.mark.parametrize("message", list(BAD_STEPS))
def test_a_step_that_cannot_run_is_a_clear_error(message):
    with pytest.raises(LlmlabError, match=message):
        forward_batch(Transformer(TINY), BlockPool(TINY, 8, 4), BAD_STEPS[message])


@pytest.mark.bad_input(kind="per-token positions (a 2-D start_pos) with an ordinary cache",
                       gets="LlmlabError pointing to llmlab.serve.batch.PagedBatch")
def test_per_token_positions_need_a_cache_that_attends():
    model = Transformer(TINY)
    with pytest.raises(LlmlabError, match="per-token positions"):
        model(torch.tensor([[1, 2]]), start_pos=torch.tensor([[0, 5]]), cache=KVCache(TINY, 8))


def test_a_graph_step_of_one_query_rows_gives_each_sequences_logits(pruned):
    """llmlab.serve.graphs runs a step as rows of one query each: a prompt chunk of n tokens is n rows
    sharing its sequence's block table, each attending to the positions up to its own. Run eagerly
    here (the graph replays exactly these kernels; its capture is tested on a GPU in test_scheduler):
    a 6-token chunk after 5 tokens already in the cache, a whole 4-token prompt, and two decodes, 12
    rows padded to 16, read through the views the graph reads, against each sequence alone. Same bound
    as above."""
    from llmlab.serve.graphs import GraphBatch, graph_inputs
    lengths, cached = [11, 4, 7, 2], [5, 0, 6, 1]              # tokens in all, and before this step
    ids = [torch.randint(512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    pool = scrambled_pool(pruned.config, 24, 4, device=DEVICE)
    scratch = pool.allocate()
    tables = [blocks_for(pool, n) for n in lengths]
    forward_batch(pruned, pool, [SequenceChunk(t, 0, x[:c]) for t, x, c in zip(tables, ids, cached) if c])
    chunks = [SequenceChunk(t, c, x[c:]) for t, x, c in zip(tables, ids, cached)]
    max_running = 6
    inputs, rows, last = graph_inputs(chunks, 16, max_running, 4, scratch)
    assert last[:4] == [5, 9, 10, 11] and inputs[5][12:] == [max_running] * 4    # padding rows: the scratch table
    tables_in_graph = torch.full((max_running + 1, 8), scratch, device=DEVICE)   # wider than any table, as in a graph
    tables_in_graph[:len(rows), :len(rows[0])] = torch.tensor(rows)
    batch = GraphBatch(pool, torch.tensor(inputs, device=DEVICE), tables_in_graph, torch.tensor(last, device=DEVICE))
    try:
        pruned.set_attention("sdpa" if DEVICE == "cuda" else "triton")
        with torch.inference_mode():
            batch.gather_tables()
            logits = pruned(batch.tokens, start_pos=batch.positions, cache=batch, last_only=True)[0]
    finally:
        pruned.set_attention("sdpa")
    assert logits.shape == (max_running, 512)
    for i, (x, c) in enumerate(zip(ids, cached)):
        reference, _ = alone(pruned, x, c)
        assert error_of_largest(logits[i], reference) <= 1e-6, f"sequence {i}"
