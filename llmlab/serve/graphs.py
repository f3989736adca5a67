"""Decode steps replayed from CUDA graphs, one graph per batch size: the batched engine at fixed shapes.

A step of B decodes on a small model does little arithmetic and launches hundreds of kernels: eager
PyTorch pays ~5-10 us of host time per launch, so the GPU waits on Python. A CUDA graph records the
launches once and replays them with one call, but it replays exactly what it recorded: the same
shapes, the same memory. So each shape gets its own graph, and a step's sequences are padded up to
the nearest bucket (1, 2, 4, 8, 16, 32, 64): at most half the rows are padding, and padding rows cost
one token of compute each, not a sequence's worth.

What changes from step to step lives in two device tensors per bucket that the graph reads: `inputs`
(5, bucket), a column per sequence, and `tables` (bucket, max_blocks), its block table:

    token        position        context length        block written        slot written

Each step fills them with two host-to-device copies and replays (the kernel reads the context lengths
as a contiguous row, so they cannot be a column of one packed tensor). The paged decode kernel reads each
sequence's context length and block table from there, so a graph recorded with one set of lengths
serves any other: nothing about a sequence is baked into the graph. Padding rows decode
token 0 at position 0 into a scratch block that no sequence owns (the pool's last, which the
BlockManager never hands out), with a context of one: their outputs are never read.

Only steps of decodes alone run here; a step with a prompt chunk runs eagerly (llmlab.serve.batch),
as vLLM does: prefill is compute bound and gains little from graphs.
"""

from __future__ import annotations

import torch

from ..errors import LlmlabError
from ..model import Transformer
from .batch import PagedBatch, SequenceChunk

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_for(n: int) -> int:
    """The smallest bucket holding n sequences."""
    return next(b for b in BUCKETS if b >= n)


def graph_inputs(chunks: list[SequenceChunk], size: int, block_size: int, scratch: int):
    """A step's decodes as the graph reads them, padded to `size` sequences: (inputs (5, size), tables
    (size, longest table)) as lists. Padding decodes token 0 at position 0 into the scratch block, with
    a context of one. Table entries past the longest table are left as they were: never read."""
    padding = size - len(chunks)
    inputs = [[c.tokens[0] for c in chunks] + [0] * padding,
              [c.start_pos for c in chunks] + [0] * padding,
              [c.start_pos + 1 for c in chunks] + [1] * padding,
              [c.block_table[c.start_pos // block_size] for c in chunks] + [scratch] * padding,
              [c.start_pos % block_size for c in chunks] + [0] * padding]
    width = max(len(c.block_table) for c in chunks)
    tables = [list(c.block_table) + [scratch] * (width - len(c.block_table)) for c in chunks]
    return inputs, tables + [[scratch] * width] * padding


class GraphBatch(PagedBatch):
    """A step of decodes whose every index is a view of `inputs` or `tables`, read by the graph at replay. It
    attends through the paged decode kernel only: the PyTorch path sizes its tensors by the step's
    longest context, a shape that would be frozen into the graph."""

    def __init__(self, pool, inputs: torch.Tensor, tables: torch.Tensor):
        self.pool, self.all_decodes, self.inputs = pool, True, inputs
        self.tokens, self.positions = inputs[0:1], inputs[1:2]                                      # (1, B)
        self.context_lens, self.write_blocks, self.write_offsets = inputs[2], inputs[3], inputs[4]  # (B,)
        self.block_tables = tables
        self.last_tokens = torch.arange(inputs.shape[1], device=inputs.device)   # every token is its sequence's last

    def attend(self, q, pool_k, pool_v, backend):
        assert backend != "naive", "DecodeGraphs refuses attention='naive'"
        return super().attend(q, pool_k, pool_v, backend)


class DecodeGraphs:
    """One captured decode step per bucket, over `model` and the pool `pool`, whose last block is
    scratch. A bucket is captured the first time a step of its size runs (~0.1-1 s), then replayed."""

    def __init__(self, model: Transformer, pool, max_running: int):
        device = model.embed.weight.device
        if device.type != "cuda":
            raise LlmlabError("CUDA graphs need the model on a CUDA device: load it with device='cuda', or leave "
                              "cuda_graphs out")
        if any(layer.attention.backend == "naive" for layer in model.layers):
            raise LlmlabError("CUDA graphs of the batched decode attend through the paged decode kernel: use "
                              "attention='sdpa' (the default) or 'triton', not 'naive'")
        if max_running > BUCKETS[-1]:
            raise LlmlabError(f"CUDA graphs are captured for steps of up to {BUCKETS[-1]} sequences, but max_running "
                              f"is {max_running}: lower it, or leave cuda_graphs out")
        self.model, self.pool, self.device = model, pool, device
        self.scratch = pool.n_blocks - 1
        # the longest block table a sequence can have: the whole context, or every block but the scratch one
        self.max_blocks = min(-(-model.config.max_seq_len // pool.block_size), self.scratch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.memory = torch.cuda.graph_pool_handle()     # one memory pool shared by every bucket's graph

    def __call__(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """The logits (len(chunks), vocab) of a step of decodes, as forward_batch gives them."""
        if not all(len(c.tokens) == 1 for c in chunks) or len(chunks) > BUCKETS[-1]:
            raise LlmlabError("a graph step runs decodes only (one token per sequence), at most "
                              f"{BUCKETS[-1]} of them; run the others with forward_batch")
        size = bucket_for(len(chunks))
        inputs, tables = graph_inputs(chunks, size, self.pool.block_size, self.scratch)
        if size not in self.graphs:
            self.graphs[size] = self.capture(size)
        graph, batch, logits = self.graphs[size]
        batch.inputs.copy_(torch.tensor(inputs, dtype=torch.long))
        batch.block_tables[:, :len(tables[0])].copy_(torch.tensor(tables, dtype=torch.long))
        graph.replay()
        return logits[:len(chunks)]

    @torch.inference_mode()
    def capture(self, size: int):
        """Record one decode step of `size` sequences, all padding; returns (graph, the GraphBatch it reads,
        its logits). The batch must live as long as the graph: the graph reads its tensors' memory, and
        memory freed would be handed to other tensors while the graph still reads it."""
        inputs = torch.tensor([[0] * size, [0] * size, [1] * size, [self.scratch] * size, [0] * size],
                              dtype=torch.long, device=self.device)
        tables = torch.full((size, self.max_blocks), self.scratch, dtype=torch.long, device=self.device)
        batch = GraphBatch(self.pool, inputs, tables)

        def step():
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
