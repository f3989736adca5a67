"""Continuous batching: many requests share one model, joining and leaving at every step.

Run one request at a time and a decode step reads every weight to make one token; batch whole requests
and each waits for the slowest of its batch. Continuous batching (Orca, then vLLM) decides again at
EVERY step what runs: a request joins as soon as there is room and leaves the moment it finishes. A step
is one forward_batch (llmlab.serve.batch) over whatever runs, each sequence in its own KV blocks.

    scheduler = Scheduler(llm, n_blocks=256, block_size=16, max_running=16, token_budget=128)
    scheduler.add(Request("a", prompt_ids, max_new_tokens=32))
    while scheduler.has_work:
        step = scheduler.step()        # step.new_tokens {request id: token}, step.finished (Requests)
        if client_left:
            scheduler.abort("a")       # between two steps: it ends now, and its blocks are freed

The policy: first come, first served. A step runs at most token_budget tokens (chunked prefill):

1. Decodes first: every running sequence with one token left to run gets its one token. When that
   token needs a new block and none is free, the most recently admitted running sequence is preempted,
   again and again until the block is found; if the most recent is the sequence itself, it is the one
   that waits.
2. Then running sequences still in their prompt run their next chunk, in admission order, each taking
   at most what is left of the budget. A long prompt is spread over several steps, and every one of
   them still runs the decodes: a 2,000-token prompt never stalls the others for a whole prefill.
3. Then waiting requests are admitted, in arrival order, while the budget, max_running and the free KV
   blocks allow. Admission takes blocks for the whole prompt (BlockManager.allocate); the prefix
   cache's hit is KV already there, so the prefill starts after it. The head of the queue blocks the
   rest (no overtaking), and a step that preempted admits nobody: its blocks were needed by sequences
   already running.

A sequence samples a token only when the last chunk of its prompt has run; it then decodes one token
a step until a stop token (kept in the output) or max_new_tokens. Its blocks are freed at once; the
full ones stay in the prefix cache for later prompts.

Preemption is recompute, not swap: the sequence's blocks are freed and it goes back to the FRONT of the
queue with prompt + the tokens generated so far as its new prompt. Swapping its KV out to host memory
would need a second pool and a copy each way over the slowest link; recomputing costs one prefill, the
cheap part of generation (many tokens per weight read), and the prefix cache keeps its full blocks
until they are needed elsewhere, so part of it often comes back as hits. Nothing else is lost: its tokens are kept, and its sampler
has no state (below), so its output continues exactly. add refuses any request the whole pool could not
hold alone, so a sequence left alone always fits, and preemption always ends.

Sampling is the engine's counter-based draw (llmlab.sampling.sample_on_device): a function of the
request's seed and the token's position, not a generator's state. So a request's tokens depend neither
on what else runs in its steps nor on preemption, and they are the tokens llm.generate_ids gives alone.

`steps` keeps a small record of every step (who ran how many tokens, blocks in use, prefix hits,
preemptions): the Gantt chart of a notebook, and with each Request's times, TTFT and TPOT.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import torch

from .. import validate
from ..errors import LlmlabError
from ..kv_cache import BlockPool
from ..llm import LLM
from ..model import Transformer
from ..sampling import SamplingParams, int64_seed, sample_on_device
from .batch import SequenceChunk, forward_batch
from .blocks import BlockManager, NoFreeBlocks
from .graphs import StepGraphs


@dataclass(eq=False)
class Request:
    """One generation: what was asked, and what came of it. Compared by identity, not by value."""
    id: Hashable
    prompt: list[int]
    max_new_tokens: int = 16
    sampling: SamplingParams = SamplingParams()
    stop_ids: Iterable[int] | None = None       # None: the tokenizer's end of text, as in generate_ids
    # what it produced, filled in by the scheduler; times are time.perf_counter()
    output: list[int] = field(default_factory=list)
    arrival_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None            # "stop", "length", or "abort" (Scheduler.abort)
    n_preempted: int = 0
    # the scheduler's bookkeeping
    n_computed: int = field(default=0, init=False, repr=False)   # leading tokens whose KV is in its blocks
    seed: int = field(default=0, init=False, repr=False)         # sampling.seed, or one drawn at add
    # sampling without its seed: requests alike in it are drawn in one call (Scheduler._sample)
    sampling_group: SamplingParams | None = field(default=None, init=False, repr=False)

    @property
    def tokens(self) -> list[int]:
        """The sequence so far, prompt + output: after a preemption, the prompt it is recomputed from."""
        return self.prompt + self.output

    @property
    def n_to_run(self) -> int:
        """Tokens whose KV is not written yet: the rest of the prompt, or the one token last sampled."""
        return len(self.prompt) + len(self.output) - self.n_computed

    @property
    def ttft(self) -> float:
        """Time to first token, in seconds: the wait in the queue and the prefill."""
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, in seconds (None for a single token)."""
        n = len(self.output) - 1
        return (self.finish_time - self.first_token_time) / n if n > 0 else None


@dataclass(frozen=True)
class Ran:
    """One sequence's part of a step. A recomputed sequence's generated tokens count as prefill."""
    request_id: Hashable
    kind: str                   # "prefill" or "decode"
    n_tokens: int
    admitted: bool = False      # it joined the running sequences in this step
    cached_tokens: int = 0      # admitted: prompt tokens the prefix cache already held, not run


@dataclass(frozen=True)
class Step:
    """What one step did."""
    index: int
    ran: tuple[Ran, ...]
    new_tokens: dict            # request id -> the token it sampled
    finished: tuple[Request, ...]
    preempted: tuple            # request ids, in the order they were preempted
    blocks_in_use: int          # during the forward
    start: float
    end: float

    @property
    def n_tokens(self) -> int:
        return sum(r.n_tokens for r in self.ran)


class Scheduler:
    """Continuous batching over one model (the policy: the module docstring)."""

    def __init__(self, llm_or_model: LLM | Transformer, n_blocks: int, block_size: int = 16,
                 max_running: int = 16, token_budget: int = 256, cuda_graphs: bool | None = None):
        """cuda_graphs: replay every step from CUDA graphs (llmlab.serve.graphs); None: the llm's own
        cuda_graphs switch (False for a bare model)."""
        model = llm_or_model.model if isinstance(llm_or_model, LLM) else llm_or_model
        if not isinstance(model, Transformer):
            raise LlmlabError(f"Scheduler runs an llmlab model: give it llmlab.load(...) or its .model, "
                              f"not {type(llm_or_model).__name__}")
        self.max_running = validate.positive_int(max_running, "max_running")
        self.token_budget = validate.positive_int(token_budget, "token_budget")
        if token_budget < max_running:
            raise LlmlabError(f"token_budget {token_budget} is smaller than max_running {max_running}: a step must "
                              f"have room for one decode token of every running sequence")
        tokenizer = llm_or_model.tokenizer if isinstance(llm_or_model, LLM) else None
        self.default_stop_ids = frozenset() if tokenizer is None else frozenset({tokenizer.eos_id})
        self.model = model
        self.blocks = BlockManager(n_blocks, block_size)
        # The pool is only the tensors: which block holds what is the BlockManager's to say. The pool's
        # own free list (BlockPool.allocate) knows nothing of it and would hand out blocks in use, so it
        # is never touched.
        weight = model.embed.weight
        if cuda_graphs is None:
            cuda_graphs = isinstance(llm_or_model, LLM) and llm_or_model.options.cuda_graphs
        # graphs pad their steps with rows that write into one scratch block, past the BlockManager's
        self.pool = BlockPool(model.config, n_blocks + bool(cuda_graphs), block_size, dtype=weight.dtype,
                              device=weight.device)
        self.graphs = StepGraphs(model, self.pool, max_running, token_budget) if cuda_graphs else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []        # in admission order: the last one is preempted first
        self.steps: list[Step] = []             # a long-running server clears it now and then
        self.n_steps = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        """Queue a request, or refuse it now if it could never run."""
        if not isinstance(request, Request):
            raise LlmlabError(f"add takes a Request, got {type(request).__name__}")
        where, config = f"request {request.id!r}", self.model.config
        if any(other.id == request.id for other in (*self.waiting, *self.running)):
            raise LlmlabError(f"{where}: a request with this id is already waiting or running; give each its own id")
        if request.output or request.finish_reason is not None:
            raise LlmlabError(f"{where} has already run: make a new Request to run it again")
        try:
            request.prompt = validate.token_ids(request.prompt, config.vocab_size, "the prompt")
            request.max_new_tokens = validate.positive_int(request.max_new_tokens, "max_new_tokens")
            stop_ids = self.default_stop_ids if request.stop_ids is None else request.stop_ids
            request.stop_ids = frozenset(validate.token_ids(stop_ids, None, "stop_ids", allow_empty=True))
        except LlmlabError as error:
            raise LlmlabError(f"{where}: {error}") from None
        if not isinstance(request.sampling, SamplingParams):
            raise LlmlabError(f"{where}: sampling must be a SamplingParams, got {type(request.sampling).__name__}")
        n_prompt, n_new = len(request.prompt), request.max_new_tokens
        if n_prompt + n_new > config.max_seq_len:
            raise LlmlabError(f"{where}: the prompt is {n_prompt} tokens and max_new_tokens is {n_new}: together more "
                              f"than the model's context of {config.max_seq_len} tokens. Shorten the prompt or ask "
                              f"for fewer new tokens.")
        room = self.blocks.n_blocks * self.blocks.block_size
        if n_prompt + n_new - 1 > room:         # the last token drawn is never run, so it needs no KV
            raise LlmlabError(f"{where}: its {n_prompt} prompt tokens and up to {n_new} new ones need KV room for "
                              f"{n_prompt + n_new - 1} tokens, more than the whole pool holds ({self.blocks.n_blocks} "
                              f"blocks of {self.blocks.block_size} = {room} tokens), so it could never run. Make the "
                              f"pool larger, or ask for fewer tokens.")
        seed = request.sampling.seed
        request.seed = int(torch.randint(2**62, ())) if seed is None else seed   # as generate_tokens draws one
        request.sampling_group = dataclasses.replace(request.sampling, seed=None)
        request.arrival_time = time.perf_counter()
        self.waiting.append(request)

    @torch.inference_mode()
    def step(self) -> Step:
        """Run one forward over what the policy picks; sample, finish and free. Returns what happened."""
        if not self.has_work:
            raise LlmlabError("nothing to run: add a request first (has_work says whether a step would run)")
        start = time.perf_counter()
        planned, preempted = self._schedule()
        chunks = [SequenceChunk(self.blocks.block_table(r.id), r.n_computed, r.tokens[r.n_computed:r.n_computed + n])
                  for r, n, _ in planned]
        if self.graphs is not None:
            logits = self.graphs(chunks)
        else:
            logits = forward_batch(self.model, self.pool, chunks)
        blocks_in_use = self.blocks.n_in_use

        ran, sampling = [], []
        for row, (request, n, hit) in enumerate(planned):
            decode = n == 1 and request.n_computed >= len(request.prompt)    # its token is one it sampled
            ran.append(Ran(request.id, "decode" if decode else "prefill", n, hit is not None, hit or 0))
            request.n_computed += n
            self.blocks.mark_computed(request.id, request.tokens[:request.n_computed])
            if request.n_to_run == 0:             # its prompt is all in: these logits pick its next token
                sampling.append((request, row))
        new_tokens, finished = self._sample(sampling, logits), []
        for request, _ in sampling:
            if self._finish(request, new_tokens[request.id]):
                finished.append(request)
        step = Step(self.n_steps, tuple(ran), new_tokens, tuple(finished), tuple(preempted), blocks_in_use,
                    start, time.perf_counter())
        self.steps.append(step)
        self.n_steps += 1
        return step

    def abort(self, request_id: Hashable) -> Request:
        """End a waiting or running request now, with finish_reason "abort": a client that left, or one
        whose text reached a stop string, needs no more tokens. A running request's blocks are freed at
        once (its full computed ones stay in the prefix cache); a waiting one holds none. Returns it.
        Like every call here, not thread-safe: call it between steps, from the thread that steps."""
        request = next((r for r in (*self.waiting, *self.running) if r.id == request_id), None)
        if request is None:
            raise LlmlabError(f"no request {request_id!r} is waiting or running: it has finished or been aborted "
                              f"already, or was never added")
        if request in self.running:
            self.blocks.free(request.id)
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.finish_reason = "abort"
        request.finish_time = time.perf_counter()
        return request

    def run(self) -> list[Request]:
        """Step until every request has finished; returns them in the order they finished."""
        finished = []
        while self.has_work:
            finished += self.step().finished
        return finished

    def _schedule(self) -> tuple[list[tuple[Request, int, int | None]], list[Hashable]]:
        """The policy's three passes (the module docstring): (request, tokens to run, its prefix hit if
        admitted now, else None) for every sequence of this step, in the order they run; and the ids
        preempted for room."""
        budget, planned, preempted = self.token_budget, [], []
        for request in list(self.running):                                  # 1. decodes
            if request in self.running and request.n_to_run == 1 and self._make_room(request, preempted):
                planned.append((request, 1, None))
                budget -= 1
        for request in self.running:                                        # 2. prompts under way
            if request.n_to_run > 1 and budget > 0:
                planned.append((request, min(request.n_to_run, budget), None))
                budget -= planned[-1][1]
        while (self.waiting and not preempted and budget > 0 and len(self.running) < self.max_running
               and self.blocks.can_allocate(self.waiting[0].tokens)):      # 3. admissions
            request = self.waiting.popleft()
            request.n_computed = hit = self.blocks.allocate(request.id, request.tokens)
            self.running.append(request)
            planned.append((request, min(request.n_to_run, budget), hit))
            budget -= planned[-1][1]
        return planned, preempted

    def _make_room(self, request: Request, preempted: list) -> bool:
        """A block for the request's next token, preempting the most recently admitted sequences until it
        fits. False if the request itself was preempted. Never runs out of sequences: alone, it fits (add)."""
        while True:
            try:
                self.blocks.reserve(request.id, len(request.tokens))
                return True
            except NoFreeBlocks:
                victim = self.running.pop()
                self.blocks.free(victim.id)
                victim.n_computed = 0           # its blocks are gone: prompt + output is prefilled again
                victim.n_preempted += 1
                self.waiting.appendleft(victim)
                preempted.append(victim.id)
                if victim is request:
                    return False

    def _sample(self, sampling: list[tuple[Request, int]], logits: torch.Tensor) -> dict:
        """Draw each request's next token from its row of logits, exactly as generate_tokens does, and
        append it to its output. Requests with the same SamplingParams are drawn in one call, so a
        step of greedy decodes costs one argmax and one copy to the host, not one per sequence."""
        groups: dict[SamplingParams, list[tuple[Request, int]]] = {}
        for request, row in sampling:     # the seed is each request's own, passed beside the params
            groups.setdefault(request.sampling_group, []).append((request, row))
        new_tokens, argmax = {}, None
        for params, members in groups.items():
            rows = [row for _, row in members]
            if params.is_greedy and params.repetition_penalty == 1.0:
                # every row's argmax at once, whatever the groups: the host waits on the device once a
                # step, not three times (seeds, positions, tokens). The argmax of bf16 logits is that of
                # their fp32 cast, which sample_on_device takes: the cast is exact and keeps the order.
                argmax = logits.argmax(dim=-1).tolist() if argmax is None else argmax
                tokens = [argmax[row] for row in rows]
            else:
                device, seen = logits.device, None
                if params.repetition_penalty != 1.0:     # what the penalty pushes down: each text's tokens so far
                    seen = torch.zeros(len(members), logits.shape[-1], dtype=torch.bool, device=device)
                    for i, (request, _) in enumerate(members):
                        seen[i, request.tokens] = True
                seeds = torch.tensor([int64_seed(r.seed) for r, _ in members], device=device)
                positions = torch.tensor([len(r.tokens) for r, _ in members], device=device)   # of the tokens drawn now
                tokens = sample_on_device(logits[rows], params, seeds, positions, seen).tolist()
            for (request, _), token in zip(members, tokens):
                request.output.append(token)
                new_tokens[request.id] = token
        now = time.perf_counter()
        for request, _ in sampling:
            if request.first_token_time is None:
                request.first_token_time = now
        return {request.id: new_tokens[request.id] for request, _ in sampling}      # in the step's order

    def _finish(self, request: Request, token: int) -> bool:
        """End the request if this token ends it, freeing its blocks at once."""
        if token in request.stop_ids:
            request.finish_reason = "stop"
        elif len(request.output) == request.max_new_tokens:
            request.finish_reason = "length"
        else:
            return False
        request.finish_time = time.perf_counter()
        self.blocks.free(request.id)
        self.running.remove(request)
        return True
