"""The continuous-batching scheduler (llmlab.serve.scheduler) against each request run alone.

The reference is llm.generate_ids: one request, prefilled in one forward and decoded into a contiguous
KVCache, sharing no code with the scheduler's chunks, block tables, prefix hits and preemptions.
Greedy tokens must be identical. That is exact maths up to fp32 summation order: a batched step's
logits differ from the eager path's by at most 5e-5 (tests/test_batch.py measures it), far below the
gap between the top two logits at any step of these prompts, so a token that differs is a bug (a
wrong position, a block read before it was written, a lost token on preemption), not rounding.
Seeded sampling is compared the same way: the draw depends only on the seed and the position.

Requests "arrive" at given steps: each is added just before that step runs. Every run ends with no
block in use.
"""

import dataclasses

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.sampling import SamplingParams
from llmlab.serve.scheduler import Request, Scheduler

TEXTS = ["The capital of France is",                                   # 5 tokens
         "Once upon a time, in a land far away, there lived a",        # 14
         "def fibonacci(n):\n    if n < 2:",                           # 13
         "1 + 1 = 2, 2 + 2 = 4, 3 + 3 =",                              # 23
         "Water boils at",                                             # 3
         "The quick brown fox jumps over the lazy dog. The dog"]       # 12
LONG = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms")                                        # 37
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=1234)


def alone(llm, request: Request) -> list[int]:
    """The reference: the request's prompt through llm.generate_ids, by itself."""
    sampling = dataclasses.asdict(request.sampling)
    return list(llm.generate_ids(request.prompt, request.max_new_tokens, stop_ids=request.stop_ids, **sampling))


def drive(scheduler: Scheduler, arrivals: dict[int, list[Request]]) -> None:
    """Add each request just before the step it arrives at, step until every one has finished, and check
    that no block is left in use."""
    step = 0
    while step <= max(arrivals) or scheduler.has_work:
        for request in arrivals.get(step, []):
            scheduler.add(request)
        if scheduler.has_work:
            scheduler.step()
        step += 1
    assert scheduler.blocks.n_in_use == 0 and not scheduler.blocks.tables


def runs_of(scheduler: Scheduler, request_id) -> list:
    """(step index, Ran) for every step the request ran in."""
    return [(step.index, ran) for step in scheduler.steps for ran in step.ran if ran.request_id == request_id]


def test_greedy_outputs_of_a_continuous_batch_match_each_request_alone(llm):
    """Six prompts of 3 to 23 tokens arriving at steps 0 to 8, through 8-token steps: prompts are
    chunked, joins and leaves happen mid-batch, and the pool is large enough that nobody is preempted."""
    tok = llm.tokenizer
    requests = [Request(i, tok.encode(text), max_new_tokens=n, stop_ids=())
                for i, (text, n) in enumerate(zip(TEXTS, [6, 4, 8, 5, 7, 6]))]
    scheduler = Scheduler(llm, n_blocks=64, block_size=4, max_running=4, token_budget=8)
    drive(scheduler, {0: requests[:2], 1: [requests[2]], 3: [requests[3]], 5: [requests[4]], 8: [requests[5]]})
    for request in requests:
        assert request.output == alone(llm, request), f"request {request.id}"
        assert request.finish_reason == "length" and request.n_preempted == 0
        assert request.arrival_time < request.first_token_time <= request.finish_time
        assert request.ttft > 0 and request.tpot > 0
    assert all(step.n_tokens <= 8 and len(step.ran) <= 4 and not step.preempted for step in scheduler.steps)
    chunked = [r.id for r in requests if sum(ran.kind == "prefill" for _, ran in runs_of(scheduler, r.id)) > 1]
    assert 3 in chunked        # 23 tokens cannot fit an 8-token step


def test_preempted_sequences_recompute_and_still_match_alone(llm):
    """Four prompts need 13 blocks of 4 tokens and the pool has 13: all are admitted, their decodes run
    out of blocks, and the latest admitted are preempted, recomputed and continued. The sampling
    request is one of them: its draws must continue exactly after recompute too. A short request
    arriving at step 1 finds the first preempted one put in front of it, and does not overtake it
    even where it alone would fit."""
    tok = llm.tokenizer
    requests = [Request(i, tok.encode(TEXTS[i]), max_new_tokens=8, stop_ids=()) for i in (0, 1, 2, 5)]
    requests[2].sampling = SAMPLED
    late = Request("late", tok.encode(TEXTS[4]), max_new_tokens=4, stop_ids=())
    scheduler = Scheduler(llm, n_blocks=13, block_size=4, max_running=4, token_budget=64)
    drive(scheduler, {0: requests, 1: [late]})
    for request in requests + [late]:
        assert request.output == alone(llm, request), f"request {request.id}"
    preemptions = [victim for step in scheduler.steps for victim in step.preempted]
    assert preemptions == [5, 2]                 # the most recently admitted first
    assert [r.n_preempted for r in requests] == [0, 0, 1, 1]
    admissions = [(step.index, ran) for step in scheduler.steps for ran in step.ran if ran.admitted]
    assert [ran.request_id for _, ran in admissions] == [0, 1, 2, 5, 2, 5, "late"]
    assert not any(ran.admitted for step in scheduler.steps if step.preempted for ran in step.ran)
    # readmitted, the sampling request prefills prompt + its 7 tokens so far, and finds most of its
    # blocks still in the prefix cache
    readmitted = admissions[4][1]
    assert readmitted.kind == "prefill" and readmitted.cached_tokens > 0
    assert readmitted.cached_tokens + readmitted.n_tokens == len(requests[2].prompt) + 7
    assert all(step.blocks_in_use <= 13 for step in scheduler.steps)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(llm):
    """Two short requests decode; a 37-token prompt arrives at step 2. With 6 tokens a step, two of them
    decodes, it takes 4 tokens a step, and the decodes go on in every one of those steps."""
    tok = llm.tokenizer
    a, b = (Request(name, tok.encode(text), max_new_tokens=12, stop_ids=()) for name, text in
            (("a", TEXTS[0]), ("b", TEXTS[4])))
    long = Request("long", tok.encode(LONG), max_new_tokens=3, stop_ids=())
    scheduler = Scheduler(llm, n_blocks=64, block_size=4, max_running=3, token_budget=6)
    drive(scheduler, {0: [a, b], 2: [long]})
    assert all(step.n_tokens <= 6 for step in scheduler.steps)
    prefill_steps = [i for i, ran in runs_of(scheduler, "long") if ran.kind == "prefill"]
    assert len(prefill_steps) == 10                                # 37 tokens, 4 a step
    assert sum(ran.n_tokens for _, ran in runs_of(scheduler, "long") if ran.kind == "prefill") == len(long.prompt)
    for i in prefill_steps:
        kinds = {ran.request_id: ran.kind for ran in scheduler.steps[i].ran}
        assert kinds["a"] == kinds["b"] == "decode", f"step {i}: {kinds}"
    assert long.first_token_time > a.first_token_time
    for request in (a, b, long):
        assert request.output == alone(llm, request), f"request {request.id}"


def test_requests_sharing_a_system_prompt_hit_the_prefix_cache(llm):
    """r1 and r2 arrive while r0 runs and share its blocks in use; r3 arrives after all have finished
    and finds them evictable, still cached. The hit is whole blocks of the shared prefix, and that
    many fewer tokens are prefilled."""
    tok = llm.tokenizer
    system = "You are a helpful assistant. Answer in one short sentence, and be precise and kind to the user."
    questions = [" What is the capital of France?", " Why is the sky blue?", " Name a prime number.",
                 " Who wrote Hamlet?"]
    requests = [Request(f"r{i}", tok.encode(system + q), max_new_tokens=4, stop_ids=())
                for i, q in enumerate(questions)]
    shared = len(tok.encode(system)) - 1        # the tokenizer may merge the last token with the question's
    scheduler = Scheduler(llm, n_blocks=64, block_size=4, max_running=4, token_budget=64)
    drive(scheduler, {0: requests[:1], 2: requests[1:3], 9: requests[3:]})
    hits = {r.id: ran.cached_tokens for r in requests for _, ran in runs_of(scheduler, r.id) if ran.admitted}
    assert hits["r0"] == 0
    for request in requests[1:]:
        assert shared // 4 * 4 <= hits[request.id] < len(request.prompt), hits
        assert hits[request.id] % 4 == 0
        prefilled = sum(ran.n_tokens for _, ran in runs_of(scheduler, request.id) if ran.kind == "prefill")
        assert prefilled == len(request.prompt) - hits[request.id]
    assert scheduler.blocks.prompt_tokens_hit == sum(hits.values())
    for request in requests:
        assert request.output == alone(llm, request), f"request {request.id}"


def test_a_seeded_request_samples_the_same_tokens_alone_and_batched(llm):
    """Alone in a scheduler, and arriving at step 2 beside others through 6-token steps (so its prompt is
    chunked): the same tokens, which are also generate_ids's with that seed. The same request with
    another seed, in the same batch, draws other tokens: the seed is really used. A greedy request with
    a repetition penalty checks that the penalty counts the tokens it generated, not only its prompt
    (its 9th token repeats " the", which is not in the prompt)."""
    tok = llm.tokenizer
    prompt = tok.encode(TEXTS[1])
    solo = Request("s", prompt, max_new_tokens=8, sampling=SAMPLED, stop_ids=())
    scheduler = Scheduler(llm.model, n_blocks=16, block_size=4)
    scheduler.add(solo)
    scheduler.run()
    batched = Request("s", prompt, max_new_tokens=8, sampling=SAMPLED, stop_ids=())
    other_seed = Request("t", prompt, max_new_tokens=8, sampling=dataclasses.replace(SAMPLED, seed=4321), stop_ids=())
    penalised = Request("p", tok.encode("Once upon a time"), max_new_tokens=12,
                        sampling=SamplingParams(repetition_penalty=1.3), stop_ids=())
    others = [Request(i, tok.encode(TEXTS[i]), max_new_tokens=6, stop_ids=()) for i in (0, 4)]
    busy = Scheduler(llm, n_blocks=64, block_size=4, max_running=4, token_budget=6)
    drive(busy, {0: others + [penalised], 2: [batched], 3: [other_seed]})
    assert sum(ran.kind == "prefill" for _, ran in runs_of(busy, "s")) > 1
    assert batched.output == solo.output == alone(llm, solo)
    assert other_seed.output != batched.output
    assert penalised.output == alone(llm, penalised)


def test_stop_tokens_and_max_new_tokens_end_requests(llm):
    """A chat answer that ends with the end-of-text token by default (as generate_ids stops), a stop id
    given by the request, and max_new_tokens; the stop token is kept in the output."""
    tok = llm.tokenizer
    chat = tok.encode_chat([{"role": "user", "content": "What is 2+2? Answer with a number only."}],
                           add_generation_prompt=True)
    counting = tok.encode(TEXTS[3])
    free_run = list(llm.generate_ids(counting, 6, stop_ids=set()))
    by_eos = Request("eos", chat, max_new_tokens=12)
    by_stop_id = Request("stop", counting, max_new_tokens=6, stop_ids={free_run[2]})
    by_length = Request("length", counting, max_new_tokens=3, stop_ids=())
    scheduler = Scheduler(llm, n_blocks=64, block_size=4, token_budget=32)
    for request in (by_eos, by_stop_id, by_length):
        scheduler.add(request)
    scheduler.run()
    assert by_eos.stop_ids == {tok.eos_id} and by_eos.output[-1] == tok.eos_id
    assert by_eos.finish_reason == "stop" and len(by_eos.output) < 12
    assert by_stop_id.finish_reason == "stop"
    assert by_stop_id.output == free_run[:free_run.index(free_run[2]) + 1]
    assert by_length.finish_reason == "length" and by_length.output == free_run[:3]
    for request in (by_eos, by_stop_id):
        assert request.output == alone(llm, request)
    without_tokenizer = Scheduler(llm.model, n_blocks=8, block_size=4)
    without_tokenizer.add(no_default := Request("x", [1, 2, 3]))
    assert no_default.stop_ids == frozenset()


def test_no_block_stays_in_use_after_run(llm):
    """Preemption, a prefix hit and both finish reasons in one run; afterwards every block is free or
    cached, and the scheduler holds no sequence."""
    tok = llm.tokenizer
    requests = [Request(i, tok.encode(TEXTS[0] + text), max_new_tokens=6, stop_ids=()) for i, text in
                enumerate(["", " a city of", " not", " Paris, and"])]
    requests[1].stop_ids = {list(llm.generate_ids(requests[1].prompt, 2, stop_ids=set()))[1]}
    scheduler = Scheduler(llm, n_blocks=7, block_size=4, token_budget=32)
    for request in requests:
        scheduler.add(request)
    finished = scheduler.run()
    assert {r.id for r in finished} == {0, 1, 2, 3}
    assert {r.finish_reason for r in finished} == {"stop", "length"}
    assert any(step.preempted for step in scheduler.steps) and scheduler.blocks.prompt_tokens_hit > 0
    blocks = scheduler.blocks
    assert blocks.n_in_use == 0 and blocks.n_free + blocks.n_evictable == blocks.n_blocks
    assert not blocks.tables and not scheduler.running and not scheduler.waiting
    assert all(0 < step.blocks_in_use <= 7 for step in scheduler.steps)


BAD_REQUESTS = {
    r"request 'e': the prompt is empty": lambda: Request("e", []),
    r"request 'n': max_new_tokens must be a positive integer, got 0": lambda: Request("n", [1], max_new_tokens=0),
    r"request 'v': token id 49152 is outside the vocabulary": lambda: Request("v", [1, 49152]),
    r"request 'c': the prompt is 8190 tokens and max_new_tokens is 3: together more than the model's "
    r"context of 8192": lambda: Request("c", [1] * 8190, max_new_tokens=3),
    r"request 'p': its 15 prompt tokens and up to 3 new ones need KV room for 17 tokens, more than the "
    r"whole pool holds \(4 blocks of 4 = 16 tokens\)": lambda: Request("p", [1] * 15, max_new_tokens=3),
    r"request 's': sampling must be a SamplingParams": lambda: Request("s", [1], sampling={"temperature": 1}),
    r"request 'x': stop_ids must be integers": lambda: Request("x", [1], stop_ids=["\n"]),
    "add takes a Request, got list": lambda: [1, 2, 3],
}


@pytest.mark.bad_input(kind="a request the scheduler could never run (empty or out-of-vocabulary prompt, past the "
                            "context, larger than the whole KV pool, bad sampling or stop ids)",
                       gets="LlmlabError at add, naming the request and the fix; nothing is queued")
@pytest.mark.parametrize("message", list(BAD_REQUESTS))
def test_a_request_that_cannot_run_is_refused_at_add(llm, message):
    scheduler = Scheduler(llm, n_blocks=4, block_size=4)
    with pytest.raises(LlmlabError, match=message):
        scheduler.add(BAD_REQUESTS[message]())
    assert not scheduler.has_work


def test_duplicate_ids_reruns_and_empty_steps_are_refused(llm):
    scheduler = Scheduler(llm, n_blocks=4, block_size=4)
    with pytest.raises(LlmlabError, match="nothing to run: add a request first"):
        scheduler.step()
    first = Request("a", [1, 2], max_new_tokens=1)
    scheduler.add(first)
    with pytest.raises(LlmlabError, match="request 'a': a request with this id is already waiting or running"):
        scheduler.add(Request("a", [3]))
    scheduler.run()
    with pytest.raises(LlmlabError, match="request 'a' has already run: make a new Request"):
        scheduler.add(first)
    scheduler.add(Request("a", [3], max_new_tokens=1))      # a finished request's id may be used again


def test_requests_that_just_fit_the_pool_run_one_after_the_other(llm):
    """15 prompt tokens and 2 new ones need KV for 16 tokens, all of a 4-block pool: accepted, and two
    such requests run in turn (the second waits for the first's blocks) instead of deadlocking."""
    scheduler = Scheduler(llm, n_blocks=4, block_size=4)
    requests = [Request(i, list(range(100 + i, 115 + i)), max_new_tokens=2, stop_ids=()) for i in range(2)]
    for request in requests:
        scheduler.add(request)
    assert [r.id for r in scheduler.run()] == [0, 1]
    assert all(len(r.output) == 2 for r in requests) and scheduler.blocks.n_in_use == 0


@pytest.mark.bad_input(kind="a scheduler with no blocks, no running slots, a token budget below max_running, or "
                            "CUDA graphs for a model off the GPU",
                       gets="LlmlabError saying what a step needs")
@pytest.mark.parametrize("kwargs, message", [
    (dict(n_blocks=0), "n_blocks must be a positive whole number, got 0"),
    (dict(n_blocks=4, block_size=4, max_running=8, token_budget=4),
     "token_budget 4 is smaller than max_running 8: a step must have room for one decode token"),
    (dict(n_blocks=4, max_running=0), "max_running must be a positive integer, got 0"),
    (dict(n_blocks=4, cuda_graphs=True), "CUDA graphs need the model on a CUDA device"),
])
def test_impossible_settings_are_refused(llm, kwargs, message):
    with pytest.raises(LlmlabError, match=message):
        Scheduler(llm, **kwargs)


def test_only_an_llmlab_model_can_be_scheduled():
    with pytest.raises(LlmlabError, match="Scheduler runs an llmlab model: give it llmlab.load"):
        Scheduler("SmolLM2", n_blocks=4)


def test_abort_a_running_request_frees_its_blocks_and_the_others_go_on(llm):
    """Three requests, room for two at a time: the first is aborted mid-decode, which frees its blocks at
    once and lets the third in; the second is untouched and still matches its run alone."""
    tok = llm.tokenizer
    requests = [Request(i, tok.encode(TEXTS[i]), max_new_tokens=8, stop_ids=()) for i in range(3)]
    scheduler = Scheduler(llm, n_blocks=64, block_size=4, max_running=2, token_budget=64)
    for request in requests:
        scheduler.add(request)
    for _ in range(3):
        scheduler.step()
    held = len(scheduler.blocks.block_table(0))
    in_use = scheduler.blocks.n_in_use
    assert scheduler.abort(0) is requests[0]
    assert requests[0].finish_reason == "abort" and len(requests[0].output) == 3
    assert scheduler.blocks.n_in_use == in_use - held and 0 not in scheduler.blocks.tables
    assert [r.id for r in scheduler.running] == [1] and [r.id for r in scheduler.waiting] == [2]
    assert [r.id for r in scheduler.run()] == [1, 2]
    for request in requests[1:]:
        assert request.output == alone(llm, request), f"request {request.id}"
    assert scheduler.blocks.n_in_use == 0 and 0 not in {ran.request_id for step in scheduler.steps[3:]
                                                        for ran in step.ran}


def test_abort_a_waiting_request_removes_it_from_the_queue(llm):
    """One slot: the second request waits, is aborted before it ever runs, and never does; a preempted
    request (waiting again, with tokens already made) is aborted the same way."""
    tok = llm.tokenizer
    first, second = (Request(i, tok.encode(TEXTS[i]), max_new_tokens=4, stop_ids=()) for i in range(2))
    scheduler = Scheduler(llm, n_blocks=64, block_size=4, max_running=1, token_budget=64)
    scheduler.add(first)
    scheduler.add(second)
    scheduler.step()
    assert scheduler.abort(1) is second and second.finish_reason == "abort" and not second.output
    assert not scheduler.waiting and [r.id for r in scheduler.run()] == [0]
    assert first.output == alone(llm, first)
    assert all(ran.request_id == 0 for step in scheduler.steps for ran in step.ran)

    # 13 blocks of 4 for four prompts: decodes run out of blocks and the latest admitted is preempted
    crowd = [Request(i, tok.encode(TEXTS[i]), max_new_tokens=8, stop_ids=()) for i in (0, 1, 2, 5)]
    scheduler = Scheduler(llm, n_blocks=13, block_size=4, max_running=4, token_budget=64)
    for request in crowd:
        scheduler.add(request)
    while not any(step.preempted for step in scheduler.steps):
        scheduler.step()
    victim = scheduler.waiting[0]
    assert victim.output and victim.id not in scheduler.blocks.tables
    scheduler.abort(victim.id)
    finished = scheduler.run()
    assert victim not in finished and victim.finish_reason == "abort"
    for request in finished:
        assert request.output == alone(llm, request), f"request {request.id}"
    assert scheduler.blocks.n_in_use == 0


@pytest.mark.bad_input(kind="Scheduler.abort of a request id that is not waiting or running (unknown, finished, "
                            "aborted already)",
                       gets="LlmlabError saying it has finished, been aborted or was never added; nothing changes")
def test_abort_of_an_unknown_or_finished_request_is_refused(llm):
    scheduler = Scheduler(llm, n_blocks=8, block_size=4)
    with pytest.raises(LlmlabError, match="no request 'nobody' is waiting or running"):
        scheduler.abort("nobody")
    scheduler.add(Request("done", [1, 2], max_new_tokens=1))
    scheduler.add(Request("gone", [3, 4], max_new_tokens=4))
    scheduler.step()
    scheduler.abort("gone")
    for request_id in ("done", "gone"):
        with pytest.raises(LlmlabError, match=f"no request '{request_id}' is waiting or running: it has finished"):
            scheduler.abort(request_id)
    assert not scheduler.has_work and scheduler.blocks.n_in_use == 0


# --- CUDA graphs per batch bucket (llmlab.serve.graphs) ---------------------------------------------

def staggered_trace(vocab_size: int, n_requests: int) -> list[Request]:
    """Random prompts of 3 to 40 tokens asking for 4 to 40 new tokens: the same for the same arguments."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 41, (n_requests,), generator=g).tolist()
    new = torch.randint(4, 41, (n_requests,), generator=g).tolist()
    return [Request(i, torch.randint(0, vocab_size, (n,), generator=g).tolist(), max_new_tokens=m, stop_ids=())
            for i, (n, m) in enumerate(zip(lengths, new))]


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_graph_steps_match_the_eager_steps(kernels):
    """Greedy, fp32, random weights, 40 requests arriving two a step: prompt chunks and decodes share
    steps of many sizes while requests join and leave. Every request's tokens with graphs (every step
    as one-query rows through the paged kernel; with kernels="triton", RMSNorm, RoPE and SwiGLU as
    Triton kernels too) equal the eager PyTorch scheduler's (prompts through the PyTorch attention
    path), and the graphs really ran, for several buckets. The logits of one step of 5 decodes (padded
    to 8 rows) are also compared directly, within 1e-4 of their scale: the eager step runs the same
    paged kernel, but a matmul over 8 rows instead of 5 may sum in another order."""
    import llmlab
    from llmlab.serve.batch import SequenceChunk, forward_batch
    eager = llmlab.load("preset:smollm2-135m", device="cuda", dtype="fp32")
    llm = llmlab.load("preset:smollm2-135m", device="cuda", dtype="fp32", kernels=kernels)   # the same weights: seed 0
    outputs, graphed = {}, None
    for graphs in (False, True):
        requests = staggered_trace(llm.config.vocab_size, 40)
        scheduler = Scheduler(llm if graphs else eager, n_blocks=240, block_size=16, max_running=40,
                              token_budget=256, cuda_graphs=graphs)
        drive(scheduler, {i // 2: requests[i:i + 2] for i in range(0, 40, 2)})
        outputs[graphs], graphed = [r.output for r in requests], scheduler
    assert outputs[True] == outputs[False]
    assert len(graphed.graphs.graphs) >= 4, sorted(graphed.graphs.graphs)
    assert any(r.kind == "prefill" and r.n_tokens > 1 for step in graphed.steps for r in step.ran)

    scheduler = Scheduler(llm, n_blocks=64, block_size=16, max_running=8, cuda_graphs=True)
    chunks = [SequenceChunk(list(range(4 * i, 4 * i + 4)), 11 * i + 3, [100 + i]) for i in range(5)]
    with torch.inference_mode():
        for pool in scheduler.pool.k + scheduler.pool.v:     # keys and values to attend at earlier positions
            pool.normal_()
        expected = forward_batch(eager.model, scheduler.pool, chunks).clone()
        got = scheduler.graphs(chunks)
    assert got.shape == expected.shape == (5, llm.config.vocab_size)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
