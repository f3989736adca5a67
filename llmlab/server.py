"""`llmlab serve`: one loaded model behind OpenAI's HTTP API, so any OpenAI client can talk to it.

    GET  /health                 200 while the engine takes requests; 503 and the reason once it does not
    GET  /stats                  what the scheduler is doing (llmlab's, not OpenAI's): requests running and
                                 waiting, KV blocks in use, steps run and how many sequences each ran
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages through the model's chat template
    POST /v1/completions         a text continued

Both POSTs stream with "stream": true, as server-sent events in OpenAI's chunk format ending with
`data: [DONE]`. Requests are read and checked by llmlab.openai_api.

Scheduling: continuous batching (llmlab.serve.scheduler). A request that arrives joins the running
batch at the next step and leaves it at the step it finishes, so no request waits for another's whole
reply. The model, its KV block pool and the Scheduler belong to one engine thread (llmlab.serve.engine): the model
is not thread-safe, and one thread stepping the whole batch is what batching is. The event loop never
touches them; the two talk through queues:

    event loop (HTTP, text)                                       engine thread (model)
    Engine.submit(request, deliver), Engine.abort(id)  -- inbox -->  Scheduler.add / abort, step()
    Completion.events, one asyncio.Queue per request  <-- deliver(token id), ..., deliver(the end)

deliver runs on the engine thread, so it hands each event to the event loop (call_soon_threadsafe).
Each request's text is made on the event loop, incrementally, and cut at its stop strings there. A
client that goes away, or whose text reaches a stop string, aborts its request: the engine frees its
blocks before its next step.

Failures: a step that raises ends the requests that were running with a 500 naming the error (a
failed step may have half-updated them) and frees them; the engine goes on with the others. If the
engine itself breaks, or the server shuts down, every request not yet ended gets a 500 saying why, and
so does every request after it: no client waits for an answer that cannot come.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .errors import LlmlabError
from .llm import LLM, sampling_params
from .openai_api import (ApiError, MAX_BODY_BYTES, Request, chunk_maker, error_from, parse_body, parse_request,
                         sse, stop_cut, too_large, usage)
from .serve.engine import Engine, EngineError, check_serve_options, make_scheduler
from .serve.scheduler import Request as EngineRequest

POLL_S = 0.5                    # how often a request with no new token checks that its client is still there


def model_name(llm: LLM) -> str:
    """The id clients ask for: a preset's "preset:NAME", else the file or folder name up to its first dot
    (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct)."""
    return llm.source if llm.source.startswith("preset:") else Path(llm.source).name.split(".")[0]


class Completion:
    """One request as its client sees it, on the event loop: the engine's events as they come, turned
    into text, stop strings cut off, the tokens counted, and why it finished."""

    def __init__(self, request: EngineRequest, tokenizer, stop: tuple[str, ...]):
        self.request, self.stop = request, stop
        self.token_bytes, self.special_ids = tokenizer.token_bytes, tokenizer.special_ids
        # One character can span several tokens (an emoji: 4 UTF-8 bytes, often 2 or more tokens): an
        # incremental decoder holds an unfinished one back, as llmlab.generate.stream_text does. That
        # generator pulls its tokens; here the engine pushes them, one event at a time.
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.text, self.sent, self.completion_tokens = "", 0, 0
        self.finish_reason: str | None = None
        self.ended = False              # the engine has nothing more for it (it finished or failed)

    def deliver(self, event) -> None:
        """Called on the engine's thread: hand the event to the event loop."""
        with contextlib.suppress(RuntimeError):       # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next_event(self):
        """The next event, or None when none came for POLL_S (the caller checks its client meanwhile)."""
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.events.get(), POLL_S)

    def text_of(self, event) -> str:
        """The text the event lets be sent ("" while a possible stop string is held back); a failed
        request raises its ApiError. finish_reason is set once the text is complete."""
        if isinstance(event, Exception):
            self.ended = True
            raise error_from(event) if isinstance(event, LlmlabError) else ApiError(500, str(event), code="engine_error")
        if isinstance(event, int):
            self.completion_tokens += 1
            if event not in self.special_ids:
                self.text += self.utf8.decode(self.token_bytes(event))
        else:                       # the end: what the decoder held back, and why the engine stopped
            self.ended = True
            self.text += self.utf8.decode(b"", final=True)
            self.finish_reason = event
        stop_at, ready = stop_cut(self.text, self.stop)
        if stop_at is not None:
            self.finish_reason = "stop"         # no token more than the stop string needed: the caller aborts
            return self.take(stop_at)
        return self.take(len(self.text) if self.finish_reason else ready)

    def take(self, end: int) -> str:
        text, self.sent = self.text[self.sent:end], end
        return text


def create_app(llm: LLM, **scheduling) -> FastAPI:
    """The app and its engine, whose thread runs from now until the app's lifespan ends (the server's
    shutdown). scheduling: make_scheduler's keywords."""
    name = model_name(llm)
    engine = Engine(make_scheduler(llm, **scheduling))
    request_ids = itertools.count()

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="llmlab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine

    async def generation(http: HttpRequest, completion: Completion) -> AsyncIterator[str]:
        """The request's texts as they come, until its end or until its client is gone. A request not
        ended by then (a stop string, a client gone, a cancelled task) is aborted in the engine."""
        engine.submit(completion.request, completion.deliver)
        try:
            while completion.finish_reason is None:
                event = await completion.next_event()
                if await http.is_disconnected():
                    return
                if event is not None:
                    yield completion.text_of(event)
        finally:
            if not completion.ended:
                engine.abort(completion.request.id)

    async def complete(http: HttpRequest, endpoint: str) -> JSONResponse | StreamingResponse:
        request = parse_request(await read_body(http), endpoint, name)
        tok = llm.tokenizer
        if endpoint == "chat":
            encode = lambda max_tokens: tok.encode_chat(request.prompt, add_generation_prompt=True, max_tokens=max_tokens)
        else:
            encode = lambda max_tokens: tok.encode(request.prompt, max_tokens=max_tokens)
        sampling = sampling_params(request.sampling)     # a bad temperature is refused before any work
        prompt_ids = await asyncio.to_thread(llm.encode_prompt, encode, request.max_tokens)
        completion = Completion(EngineRequest(next(request_ids), prompt_ids, max_new_tokens=request.max_tokens,
                                              sampling=sampling), tok, request.stop)
        texts = generation(http, completion)
        chunk = chunk_maker(endpoint, name)
        reply_usage = lambda: usage(len(prompt_ids), completion.completion_tokens)
        if not request.stream:
            text = "".join([text async for text in texts])
            if completion.finish_reason is None:           # the client has left
                return JSONResponse({}, status_code=499)
            return JSONResponse(chunk(text, completion.finish_reason, whole=True) | {"usage": reply_usage()})
        # the first text is awaited before any byte is sent: a request refused or failed by then gets its
        # status in the response's, as when it is not streamed
        first = await anext(texts, None)
        if first is None:
            return JSONResponse({}, status_code=499)

        async def events() -> AsyncIterator[str]:
            if endpoint == "chat":
                yield sse(chunk("", None, role=True))
            text = first
            try:
                while text is not None:
                    if text:
                        yield sse(chunk(text, None))
                    if completion.finish_reason is not None:
                        yield sse(chunk("", completion.finish_reason))
                    text = await anext(texts, None)
            except ApiError as e:              # it failed after its first token: the stream says so, and ends
                yield sse(e.body())
                return
            if request.include_usage:
                yield sse(chunk(None, None) | {"choices": [], "usage": reply_usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        if engine.closed is not None:
            return JSONResponse({"status": "error", "reason": engine.closed}, status_code=503)
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return engine.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llmlab"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, "chat")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, "completions")

    @app.exception_handler(ApiError)
    async def refused(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(LlmlabError)
    async def refused_by_llmlab(_, e: LlmlabError):
        return await refused(_, error_from(e))

    @app.exception_handler(HTTPException)
    async def not_here(_, e: HTTPException):      # an unknown path or method, in OpenAI's shape too
        return await refused(_, ApiError(e.status_code, str(e.detail)))

    return app


async def read_body(http: HttpRequest) -> dict:
    """The body, refused as soon as it is known to be too large: by its Content-Length, or by the bytes
    that arrive (a client may send no length, or a false one)."""
    if int(http.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large()
    data = bytearray()
    async for part in http.stream():
        data += part
        if len(data) > MAX_BODY_BYTES:
            raise too_large()
    return parse_body(bytes(data))


class Server(uvicorn.Server):
    """uvicorn's server, which stops the engine as it starts to shut down (Ctrl-C, SIGTERM): the requests
    under way end at once, each with a 500 saying why, instead of holding the shutdown up for
    timeout_graceful_shutdown and then being cut off without a word."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        await asyncio.to_thread(self.engine.stop)
        await super().shutdown(sockets)


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, on_ready: Callable[[str], None] = print,
          **scheduling) -> None:
    """Serve until interrupted. The socket is bound here, so that port 0 (any free port) can be reported:
    on_ready gets the API's base URL once the server accepts connections. scheduling: make_scheduler's
    max_running, kv_blocks, block_size, token_budget."""
    app = create_app(llm, **scheduling)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise LlmlabError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port (0: any free one)") from None
    bound_host, bound_port = sock.getsockname()[:2]
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5), app.state.engine)

    async def run() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
            on_ready(f"http://{shown}:{bound_port}/v1")
        await serving

    asyncio.run(run())
