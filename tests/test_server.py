"""`llmlab serve` as a client sees it: a real server in a subprocess, spoken to by OpenAI's own client.

The reference for every text is the engine's own eager generation in this process (llm.chat,
llm.generate), never the server's code. Replies are kept short: the whole file runs in about a minute
on a 2-core CPU.
"""

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

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


def test_stop_string_cuts_the_text_there(client, llm):
    full = llm.generate(PROMPT, N)               # " Paris.\n\nThe answer is: ..."
    stop = full[3:6]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, stop=[stop, "never seen"])
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full[:full.index(stop)]


def test_a_seed_repeats_a_sampled_reply(client):
    a, b = (chat(client, max_tokens=N, temperature=1.0, top_p=0.95, seed=7).choices[0].message.content for _ in "ab")
    assert a == b


def test_concurrent_requests_each_get_their_own_reply(client, llm):
    questions = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello."]
    expected = [llm.chat([{"role": "user", "content": q}], max_new_tokens=N) for q in questions]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda q: chat(client, messages=[{"role": "user", "content": q}], max_tokens=N,
                                               stream=q.startswith("Name")), questions))
    texts = [r.choices[0].message.content if not isinstance(r, openai.Stream) else
             "".join(c.choices[0].delta.content or "" for c in r) for r in replies]
    assert texts == expected


def test_a_client_that_disconnects_mid_stream_frees_the_engine(server_url, client):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server_url}/chat/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())            # one chunk, then the connection closes
    start = time.monotonic()
    reply = chat(client, max_tokens=4)
    # 2,000 tokens would take over a minute here; a freed engine answers a 4-token request in seconds
    assert time.monotonic() - start < 15 and reply.usage.completion_tokens <= 4


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
]


@pytest.mark.bad_input(kind="a bad request to llmlab serve (malformed JSON, not UTF-8, wrong types, unknown model, "
                            "max_tokens or prompt beyond the context, empty messages, bad role, n > 1, body over 1 MiB)",
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
