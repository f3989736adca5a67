"""`llmlab serve` as a client sees it: a real server in a subprocess, spoken to by OpenAI's own client.

The reference for every text is the engine's own eager generation in this process (llm.chat,
llm.generate), never the server's code: each request alone, whatever else the server's scheduler
batched it with. Whether requests really ran together is read from the server's GET /stats (how many
sequences each step ran, KV blocks in use). Failures inside the engine are made in this process, on an
app served by Starlette's TestClient, or on the Engine itself. Replies are kept short: the whole file
runs in about a minute on a 2-core CPU.
"""

import contextlib
import itertools
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from llmlab import cli
from llmlab.serve import scheduler as scheduler_module
from llmlab.serve.scheduler import Request as EngineRequest, Scheduler
from llmlab.serve.engine import Engine, EngineError
from llmlab.server import create_app

MODEL = "SmolLM2-135M-Instruct"
N = 12                                  # new tokens per reply
START_DEADLINE_S = 120
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server_url():
    """The base URL of `llmlab serve --port 0`, started once for this file and always stopped at the end.
    Its stderr goes to a file, so that a chatty server can never block on a full pipe."""
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "serve", "--port", "0"],
                               stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        url = None
        while url is None:
            log.seek(0)
            found = re.search(rf"llmlab serving {MODEL} at (http://127\.0\.0\.1:\d+/v1)", log.read())
            url = found and found[1]
            if url is None:
                assert process.poll() is None, f"the server exited with {process.returncode}"
                assert time.monotonic() < deadline, f"no address printed within {START_DEADLINE_S} s"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url, api_key="none", max_retries=0, timeout=60)


def chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=kwargs.pop("messages", MESSAGES), **kwargs)


def stats(server_url) -> dict:
    return httpx.get(server_url.removesuffix("/v1") + "/stats", timeout=10).json()


def batched_steps(server_url) -> int:
    """How many steps so far ran more than one sequence."""
    return sum(count for n, count in stats(server_url)["sequences_per_step"].items() if int(n) > 1)


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_greedy_is_the_engines_reply_with_its_token_counts(client, llm):
    reply = chat(client, max_tokens=N, temperature=0)
    assert reply.choices[0].message.content == llm.chat(MESSAGES, max_new_tokens=N)
    prompt_ids = llm.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
    new_ids = list(llm.generate_ids(prompt_ids, N))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), len(new_ids))
    assert reply.usage.total_tokens == len(prompt_ids) + len(new_ids)
    assert reply.choices[0].finish_reason == ("stop" if new_ids[-1] == llm.tokenizer.eos_id else "length")


def test_chat_stream_deltas_join_to_the_whole_reply(client):
    whole = chat(client, max_tokens=N, temperature=0).choices[0].message.content
    chunks = list(chat(client, max_tokens=N, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= N


def test_chat_reply_that_ends_with_eos_finishes_with_stop(client, llm):
    messages = [{"role": "user", "content": "Reply with one word: yes or no?"}]
    new_ids = list(llm.generate_ids(llm.tokenizer.encode_chat(messages, add_generation_prompt=True), N))
    assert new_ids[-1] == llm.tokenizer.eos_id and len(new_ids) < N       # SmolLM2 says "Yes.<|im_end|>"
    reply = chat(client, messages=messages, max_tokens=N)
    assert reply.choices[0].message.content == llm.chat(messages, max_new_tokens=N)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(new_ids)           # <|im_end|> counts: the model made it


def test_completions_equal_generate(client, llm):
    expected = llm.generate(PROMPT, N)
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPT))
    assert reply.usage.completion_tokens == len(list(llm.generate_ids(llm.tokenizer.encode(PROMPT), N)))
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


def test_stop_string_cuts_the_text_there_and_ends_the_request(server_url, client, llm):
    full = llm.generate(PROMPT, N)               # " Paris.\n\nThe answer is: ..."
    stop = full[3:6]
    aborted = stats(server_url)["requests_aborted"]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, stop=[stop, "never seen"])
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full[:full.index(stop)]
    # the stop string comes at the 2nd of 12 tokens: both requests were aborted, not run to the end
    assert wait_until(lambda: stats(server_url)["requests_aborted"] == aborted + 2, timeout_s=10), stats(server_url)


def test_a_seed_repeats_a_sampled_reply(client):
    a, b = (chat(client, max_tokens=N, temperature=1.0, top_p=0.95, seed=7).choices[0].message.content for _ in "ab")
    assert a == b


def test_concurrent_requests_each_get_their_own_reply_and_run_together(server_url, client, llm):
    """Six clients at once, chat and completions, one of them streamed: each reply is its prompt's reply
    alone (greedy), and the server's steps ran several of them together."""
    questions = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello."]
    prompts = ["Once upon a time", "def fibonacci(n):"]
    expected = ([llm.chat([{"role": "user", "content": q}], max_new_tokens=N) for q in questions]
                + [llm.generate(p, N) for p in prompts])
    before = batched_steps(server_url)

    def ask(i):
        if i >= len(questions):
            return client.completions.create(model=MODEL, prompt=prompts[i - len(questions)], max_tokens=N,
                                             temperature=0).choices[0].text
        reply = chat(client, messages=[{"role": "user", "content": questions[i]}], max_tokens=N, stream=i == 1)
        if isinstance(reply, openai.Stream):
            return "".join(c.choices[0].delta.content or "" for c in reply)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(expected)) as pool:
        texts = list(pool.map(ask, range(len(expected))))
    assert texts == expected
    assert batched_steps(server_url) > before


def test_several_streams_at_once_each_get_their_own_tokens_in_order(client, llm):
    """Four streams open at the same time, each with its own prompt: each client's deltas, in the order
    they came, join to its own prompt's reply, and every stream was still open when each other began."""
    questions = ["Name a fruit.", "What is the capital of Italy?", "Count to five.", "Name a planet."]
    expected = [llm.chat([{"role": "user", "content": q}], max_new_tokens=N) for q in questions]

    def listen(question):
        chunks = chat(client, messages=[{"role": "user", "content": question}], max_tokens=N, stream=True)
        return [(time.monotonic(), c.choices[0].delta.content or "") for c in chunks if c.choices]

    with ThreadPoolExecutor(len(questions)) as pool:
        streams = list(pool.map(listen, questions))
    assert ["".join(delta for _, delta in stream) for stream in streams] == expected
    assert all(sum(bool(delta) for _, delta in stream) > 1 for stream in streams)    # streamed, not in one piece
    assert max(stream[0][0] for stream in streams) < min(stream[-1][0] for stream in streams)


def test_a_client_that_disconnects_mid_stream_is_aborted_and_its_blocks_freed(server_url, client, llm):
    """A 2,000-token stream left after its first chunk, while two other requests run: the others still get
    their replies, and the left one is aborted (2,000 tokens would take minutes here), leaving no KV
    block in use and nothing running."""
    aborted = stats(server_url)["requests_aborted"]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000, "stream": True}
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=N,
                                                                  temperature=0).choices[0].text, p)
                  for p in (PROMPT, "Water boils at")]
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{server_url}/chat/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())            # one chunk, then the connection closes
        assert [f.result() for f in others] == [llm.generate(p, N) for p in (PROMPT, "Water boils at")]
    assert wait_until(lambda: stats(server_url)["running"] == 0, timeout_s=15), stats(server_url)
    now = stats(server_url)
    assert now["kv_blocks_in_use"] == 0 and now["waiting"] == 0 and now["requests_aborted"] == aborted + 1


def test_bounded_load_all_succeed_with_their_usage(client):
    def one(i):
        return client.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=16, temperature=0.5, seed=i)
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(one, range(16)))
    assert time.monotonic() - start < 90
    for r in replies:
        assert 1 <= r.usage.completion_tokens <= 16
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


BAD_REQUESTS = [  # (what, path, body (bytes sent as they are), status, words in the message)
    ("malformed JSON", "chat/completions", b'{"model": "x", "messages": [', 400, "not valid JSON"),
    ("not a JSON object", "chat/completions", b'[1, 2]', 400, "JSON object"),
    ("invalid UTF-8", "completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("unknown model", "chat/completions", {"model": "gpt-5", "messages": MESSAGES}, 404, "does not exist"),
    ("max_tokens 0", "chat/completions", {"messages": MESSAGES, "max_tokens": 0}, 400, "positive integer"),
    ("max_tokens negative", "completions", {"prompt": PROMPT, "max_tokens": -5}, 400, "positive integer"),
    ("max_tokens over the context", "chat/completions", {"messages": MESSAGES, "max_tokens": 10**6}, 400, "context"),
    ("max_tokens a string", "completions", {"prompt": PROMPT, "max_tokens": "10"}, 400, "positive integer"),
    ("temperature a string", "chat/completions", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("a prompt over the context", "completions", {"prompt": "word " * 9000, "max_tokens": 4}, 400, "context"),
    ("empty messages", "chat/completions", {"messages": []}, 400, "non-empty list"),
    ("a bad role", "chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("content not text", "chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("n > 1", "chat/completions", {"messages": MESSAGES, "n": 2}, 400, "n must be 1"),
    ("stop not text", "completions", {"prompt": PROMPT, "stop": 3}, 400, "stop"),
    ("an unknown argument", "completions", {"prompt": PROMPT, "wobble": 1}, 400, "unrecognized"),
    ("an unsupported one", "completions", {"prompt": PROMPT, "logprobs": 5}, 400, "not supported"),
    ("a body over 1 MiB", "completions", {"prompt": "x" * (1 << 20)}, 413, "larger than"),
    ("a seed past int64", "completions", {"prompt": PROMPT, "seed": 2**63, "temperature": 1}, 400, "int64"),
]


@pytest.mark.bad_input(kind="a bad request to llmlab serve (malformed JSON, not UTF-8, wrong types, unknown model, "
                            "max_tokens or prompt beyond the context, empty messages, bad role, n > 1, body over 1 MiB, "
                            "a seed the sampler cannot hold)",
                       gets="4xx with an OpenAI-style error JSON; the server goes on serving")
@pytest.mark.parametrize("what, path, body, status, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_and_openai_error(server_url, what, path, body, status, words):
    if isinstance(body, dict):
        body = json.dumps({"model": MODEL, **body}).encode()
    response = httpx.post(f"{server_url}/{path}", content=body, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and {"message", "param", "code"} <= error.keys()
    assert words in error["message"]


@pytest.mark.bad_input(kind="a request body that says it is small and is not, or says it is huge",
                       gets="413 with an OpenAI-style error JSON, before the body is all read")
def test_a_false_or_huge_content_length_is_refused(server_url):
    host, port = re.match(r"http://(.+):(\d+)/", server_url).groups()
    with socket.create_connection((host, int(port)), timeout=30) as raw:     # httpx would not send a false length
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1073741824\r\n\r\n{}")
        assert raw.recv(100).startswith(b"HTTP/1.1 413")
    def chunks():          # no Content-Length: sent chunked, counted as it arrives
        for _ in range(20):
            yield b" " * 100_000
    chunked = httpx.post(f"{server_url}/completions", content=chunks(), timeout=60)
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]["message"]


def test_the_server_still_answers_after_the_bad_requests(server_url, client):
    assert httpx.get(server_url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
    assert chat(client, max_tokens=2).usage.completion_tokens <= 2


# --- failures inside the engine, made in this process ------------------------------------------

class Listener:
    """A consumer of one request's events, as the engine delivers them (on its thread)."""

    def __init__(self):
        self.events, self.ended = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if not isinstance(event, int):
            self.ended.set()

    def end(self):
        assert self.ended.wait(60), f"no end delivered; events so far: {self.events}"
        return self.events[-1]


@pytest.fixture
def failing_forward(monkeypatch):
    """fail(calls, before): make the scheduler's forward pass raise on those calls, counted from 0 (a
    kernel falling over mid-step); before(call) runs first at every call."""
    def fail(calls: set[int], before=lambda call: None):
        real, counter = scheduler_module.forward_batch, itertools.count()

        def forward(*args):
            call = next(counter)
            before(call)
            if call in calls:
                raise RuntimeError("a kernel fell over")
            return real(*args)
        monkeypatch.setattr(scheduler_module, "forward_batch", forward)
    return fail


def test_a_failed_step_ends_the_running_requests_and_the_engine_goes_on(llm, failing_forward):
    """One slot: a runs, b waits. The second step raises: a gets the error and its blocks are freed; b,
    untouched in the queue, then runs to the reply it gives alone, and so does c, sent after the failure."""
    b_sent = threading.Event()      # the first step waits for it: b is then queued when the second one fails
    failing_forward({1}, before=lambda call: call > 0 or b_sent.wait(60))
    scheduler = Scheduler(llm, n_blocks=32, block_size=4, max_running=1, token_budget=16)
    engine = Engine(scheduler)
    try:
        prompts = [llm.tokenizer.encode(text) for text in (PROMPT, "Water boils at", "Once upon a time")]
        listeners = [Listener() for _ in prompts]
        for i in (0, 1):
            engine.submit(EngineRequest(i, prompts[i], max_new_tokens=4), listeners[i])
        b_sent.set()
        error = listeners[0].end()
        assert isinstance(error, EngineError) and "RuntimeError: a kernel fell over" in str(error)
        engine.submit(EngineRequest(2, prompts[2], max_new_tokens=4), listeners[2])
        for prompt, listener in zip(prompts[1:], listeners[1:]):
            assert listener.end() in ("stop", "length")
            assert listener.events[:-1] == list(llm.generate_ids(prompt, 4))
        assert engine.closed is None and scheduler.blocks.n_in_use == 0
    finally:
        engine.stop()
    assert not engine.thread.is_alive() and engine.closed == "the server is shutting down"


def test_stopping_the_engine_ends_every_request_with_the_reason(llm):
    """A request under way and one queued behind it both end with "the server is shutting down", and a
    request sent afterwards gets it at once: nobody waits for a token that cannot come."""
    engine = Engine(Scheduler(llm, n_blocks=64, block_size=16, max_running=1))
    prompt = llm.tokenizer.encode(PROMPT)
    running, queued, late = Listener(), Listener(), Listener()
    engine.submit(EngineRequest("running", prompt, max_new_tokens=500, stop_ids=()), running)
    engine.submit(EngineRequest("queued", prompt, max_new_tokens=4), queued)
    assert wait_until(lambda: running.events, timeout_s=30)
    engine.stop()
    assert not engine.thread.is_alive()
    engine.submit(EngineRequest("late", prompt), late)
    for listener in (running, queued, late):
        end = listener.end()
        assert isinstance(end, EngineError) and str(end) == "the server is shutting down"
    assert all(isinstance(event, int) for event in running.events[:-1]) and queued.events == [queued.events[-1]]


@pytest.fixture
def local_app(llm):
    """make(**scheduling): an app on this process's model, served by Starlette's TestClient, and OpenAI's
    client speaking to it. The TestClient's exit runs the app's shutdown, which stops its engine."""
    apps = []
    with contextlib.ExitStack() as stack:
        def make(**scheduling):
            apps.append(create_app(llm, **scheduling))
            http = stack.enter_context(TestClient(apps[-1], raise_server_exceptions=False))
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
            return apps[-1], http, client
        yield make
    assert not any(app.state.engine.thread.is_alive() for app in apps)


def test_a_failed_step_gets_a_500_and_the_server_goes_on(local_app, llm, failing_forward):
    """A request whose step fails gets a 500 in OpenAI's shape naming the error, before its first token as
    the response's status, after it as an error event that ends the stream (OpenAI's client raises it);
    the next request is answered as usual."""
    app, http, client = local_app(max_running=4, kv_blocks=64, block_size=4)
    scheduler = app.state.engine.scheduler
    failing_forward({0, 3})
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
    assert response.status_code == 500
    assert response.json()["error"] | {"message": "?"} == {"message": "?", "type": "server_error", "param": None,
                                                          "code": "engine_error"}
    assert "RuntimeError: a kernel fell over" in response.json()["error"]["message"]
    with pytest.raises(openai.APIError, match="a kernel fell over"):
        for _ in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, stream=True):
            pass
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N)
    assert reply.choices[0].text == llm.generate(PROMPT, N)
    assert http.get("/health").json() == {"status": "ok"} and scheduler.blocks.n_in_use == 0


def test_a_broken_engine_answers_every_request_with_a_500(local_app, failing_forward):
    """A step fails and freeing its request fails too: the scheduler's state is in doubt, so the engine
    stops. The request under way and every later one get a 500 saying why, at once, and /health says so."""
    app, http, client = local_app(max_running=4, kv_blocks=64, block_size=4)
    failing_forward({0})
    app.state.engine.scheduler.abort = lambda request_id: 1 / 0
    for _ in range(2):
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        assert response.status_code == 500
        assert "the engine stopped after an internal error (ZeroDivisionError" in response.json()["error"]["message"]
    health = http.get("/health")
    assert health.status_code == 503 and "ZeroDivisionError" in health.json()["reason"]


@pytest.mark.bad_input(kind="a request to llmlab serve larger than its whole KV pool (--kv-blocks x --block-size)",
                       gets="400 with an OpenAI-style error JSON naming the pool; the server goes on serving")
def test_a_request_larger_than_the_pool_is_refused(local_app, llm):
    app, http, client = local_app(max_running=2, kv_blocks=4, block_size=4)
    with pytest.raises(openai.BadRequestError, match=r"more than the whole pool holds \(4 blocks of 4 = 16 tokens\)"):
        client.completions.create(model=MODEL, prompt="word " * 20, max_tokens=4)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].text == llm.generate(PROMPT, 4)


# --- the command line --------------------------------------------------------------------------

SERVE_FLAGS = [
    (["--max-running", "0"], "argument --max-running: must be a whole number of at least 1, got '0'"),
    (["--kv-blocks", "-3"], "argument --kv-blocks: must be a whole number of at least 1"),
    (["--block-size", "four"], "argument --block-size: must be a whole number of at least 1, got 'four'"),
    (["--token-budget", "8"], "--token-budget 8 is smaller than --max-running 16"),
    (["--tp", "2"], "llmlab serve runs in one process on one device, so --tp is 1"),
    (["--compile", "default"], "llmlab serve cannot run this switch: compile, steps_per_graph"),
    (["--kernels", "fused-decode"], "kernels='fused-decode' build the fixed-shape decode step"),
    (["--speculative", "prompt-lookup:4"], "cannot run this switch: speculative decoding"),
    (["--kv-cache", "paged"], "kv_cache='paged' is the KV cache of one generation"),
]


@pytest.mark.bad_input(kind="llmlab serve with a bad scheduling flag (--max-running, --kv-blocks, --block-size, "
                            "--token-budget) or a switch the scheduler cannot run (compile, steps_per_graph, fused-decode, "
                            "speculative, tp > 1, a non-default kv_cache)",
                       gets="one error: line saying what serve runs, exit 2, before any model loads")
@pytest.mark.parametrize("flags, message", SERVE_FLAGS, ids=[" ".join(f) for f, _ in SERVE_FLAGS])
def test_bad_serve_flags_exit_2_before_loading(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(cli, "load_model", lambda args: pytest.fail("a model was loaded"))
    try:
        code = cli.main(["serve", "--port", "0", *flags])
    except SystemExit as e:             # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and message in err and "Traceback" not in err
