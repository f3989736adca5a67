"""Every step of the scheduler replayed from a CUDA graph, one graph per number of tokens: the batched
engine at fixed shapes.

A step on a small model does little arithmetic and launches hundreds of kernels: eager PyTorch pays
~5-10 us of host time per launch, so the GPU waits on Python (an eager step of the 1B preset takes
~9-20 ms on an H200 whatever it holds; its graph takes 2-4 ms). A CUDA graph records the launches once
and replays them with one call, but it replays exactly what it recorded: the same shapes, the same
memory. So a graph is recorded per step size, and a step is padded up to the nearest bucket.

What makes one graph serve every mix of prompts and decodes: a prompt chunk of n tokens is n decodes
that share one block table. Token i of the chunk, at position p + i, attends to the keys at positions
0 .. p + i of its sequence, which is exactly causal attention, and the keys of the chunk's earlier
tokens are in the blocks already: every token's keys and values are written before any token of the
layer attends. So a step of T tokens, whatever sequences they belong to, is T rows of ONE query each,
and the paged decode kernel (llmlab.kernels.paged_attention) attends them all, reading each row's
context length and block table from device memory. The price: a chunk's rows each read their
sequence's keys again (n x context reads where a prefill kernel reads the context once per tile),
cheap for the prompts of a chat server, a poor trade for prompts of many thousand tokens.

What changes from step to step lives in three device tensors per bucket that the graph reads:

    inputs  (6, T)                token, position, context length, block written, slot written, sequence
    tables  (max_running + 1, max_blocks)   each sequence's block table; the last row all scratch
    last    (max_running,)        the row of each sequence's last token: the head runs on these only

Each step fills them with host-to-device copies and replays; the graph itself gathers each row's
table from its sequence's. Padding rows decode token 0 at position 0 into a scratch block that no
sequence owns (the pool's last, which the BlockManager never hands out), with a context of one:
their outputs are never read.
"""

from __future__ import annotations

import torch

from ..errors import LlmlabError
from ..model import Transformer
from .batch import PagedBatch, SequenceChunk

MAX_TOKENS = 1024               # the largest step recorded: one graph per 32 tokens up to the token budget


def buckets(max_tokens: int) -> tuple[int, ...]:
    """Step sizes recorded for steps of up to max_tokens tokens: powers of two to 32, then every
    multiple of 32, so a step of decodes pads at most to double, and a step with a chunk by < 32 rows."""
    small = tuple(b for b in (1, 2, 4, 8, 16) if b < max_tokens)
    return small + tuple(range(32, max_tokens + 32, 32))


def padding_row(scratch: int, max_running: int) -> tuple[int, ...]:
    """A padding row's column of `inputs`: token 0 at position 0, a context of one, written into slot 0
    of the scratch block, its table the scratch row (the last of `tables`)."""
    return 0, 0, 1, scratch, 0, max_running


def graph_inputs(chunks: list[SequenceChunk], size: int, max_running: int, block_size: int, scratch: int):
    """A step as the graph reads it, padded to `size` rows: (inputs (6, size), tables (sequences, longest
    table), last (max_running,)) as lists. Table entries past the longest table are never read."""
    rows = []           # one (token, position, context, block, slot, sequence) per token: built per row, then transposed
    for s, chunk in enumerate(chunks):
        table = chunk.block_table
        rows += [(token, p, p + 1, table[p // block_size], p % block_size, s)
                 for p, token in enumerate(chunk.tokens, chunk.start_pos)]
    rows += [padding_row(scratch, max_running)] * (size - len(rows))
    inputs = [list(column) for column in zip(*rows)]
    width = max(len(c.block_table) for c in chunks)
    tables = [list(c.block_table) + [scratch] * (width - len(c.block_table)) for c in chunks]
    last, end = [0] * max_running, -1          # padding sequences point at row 0: their logits are not read
    for s, chunk in enumerate(chunks):
        end += len(chunk.tokens)
        last[s] = end
    return inputs, tables, last


class GraphBatch(PagedBatch):
    """A step of one-query rows whose every index is a view of `inputs`, `tables` or `last`, read by the
    graph at replay. It attends through the paged decode kernel only: the PyTorch path sizes its
    tensors by the step's longest context, a shape that would be frozen into the graph."""

    def __init__(self, pool, inputs: torch.Tensor, tables: torch.Tensor, last: torch.Tensor):
        self.pool, self.all_decodes, self.inputs, self.tables = pool, True, inputs, tables
        self.tokens, self.positions = inputs[0:1], inputs[1:2]                                      # (1, T)
        self.context_lens, self.write_blocks, self.write_offsets = inputs[2], inputs[3], inputs[4]  # (T,)
        self.sequence = inputs[5]
        self.last_tokens = last
        self.block_tables = None        # each row's table: gathered inside the graph, once a step

    def gather_tables(self) -> None:
        self.block_tables = self.tables[self.sequence]         # (T, max_blocks)

    def attend(self, q, pool_k, pool_v, backend):
        assert backend != "naive", "StepGraphs refuses attention='naive'"
        return super().attend(q, pool_k, pool_v, backend)


class StepGraphs:
    """One captured step per bucket of tokens, over `model` and the pool `pool`, whose last block is
    scratch. A bucket is captured the first time a step of its size runs (~0.1-1 s), then replayed."""

    def __init__(self, model: Transformer, pool, max_running: int, max_tokens: int):
        device = model.embed.weight.device
        if device.type != "cuda":
            raise LlmlabError("CUDA graphs need the model on a CUDA device: load it with device='cuda', or leave "
                              "cuda_graphs out")
        if any(layer.attention.backend == "naive" for layer in model.layers):
            raise LlmlabError("CUDA graphs of the scheduler's steps attend through the paged decode kernel: use "
                              "attention='sdpa' (the default) or 'triton', not 'naive'")
        if max_tokens > MAX_TOKENS:
            raise LlmlabError(f"CUDA graphs are recorded for steps of up to {MAX_TOKENS} tokens, but the token budget "
                              f"is {max_tokens}: lower it, or leave cuda_graphs out")
        self.model, self.pool, self.device, self.max_running = model, pool, device, max_running
        self.buckets = buckets(max_tokens)
        self.scratch = pool.n_blocks - 1
        # the longest block table a sequence can have: the whole context, or every block but the scratch one
        self.max_blocks = min(-(-model.config.max_seq_len // pool.block_size), self.scratch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, GraphBatch, torch.Tensor]] = {}
        self.memory = torch.cuda.graph_pool_handle()     # one memory pool shared by every bucket's graph

    def __call__(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """The logits (len(chunks), vocab) of each sequence's last token, as forward_batch gives them."""
        n_tokens = sum(len(c.tokens) for c in chunks)
        if n_tokens > self.buckets[-1] or len(chunks) > self.max_running:
            raise LlmlabError(f"a graph step runs at most {self.buckets[-1]} tokens of at most {self.max_running} "
                              f"sequences, not {n_tokens} of {len(chunks)}; run it with forward_batch")
        size = next(b for b in self.buckets if b >= n_tokens)
        inputs, tables, last = graph_inputs(chunks, size, self.max_running, self.pool.block_size, self.scratch)
        if size not in self.graphs:
            self.graphs[size] = self.capture(size)
        graph, batch, logits = self.graphs[size]
        batch.inputs.copy_(torch.tensor(inputs, dtype=torch.long))
        batch.tables[:len(tables), :len(tables[0])].copy_(torch.tensor(tables, dtype=torch.long))
        batch.last_tokens.copy_(torch.tensor(last, dtype=torch.long))
        graph.replay()
        return logits[:len(chunks)]

    @torch.inference_mode()
    def capture(self, size: int):
        """Record one step of `size` rows, all padding; returns (graph, the GraphBatch it reads, its
        logits). The batch must live as long as the graph: the graph reads its tensors' memory, and
        memory freed would be handed to other tensors while the graph still reads it."""
        inputs = torch.tensor([[value] * size for value in padding_row(self.scratch, self.max_running)],
                              dtype=torch.long, device=self.device)
        tables = torch.full((self.max_running + 1, self.max_blocks), self.scratch, dtype=torch.long, device=self.device)
        last = torch.zeros(self.max_running, dtype=torch.long, device=self.device)
        batch = GraphBatch(self.pool, inputs, tables, last)

        def step():
            batch.gather_tables()
            return self.model(batch.tokens, start_pos=batch.positions, cache=batch, last_only=True)[0]

        # warm up on a side stream first: Triton compiles its kernels and cuBLAS picks its algorithms
        # outside the capture, where neither may happen
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory):
            logits = step()
        return graph, batch, logits
