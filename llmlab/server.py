"""`llmlab serve`: one loaded model behind OpenAI's HTTP API, so any OpenAI client can talk to it.

    GET  /health                 200 while the server is up
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages through the model's chat template
    POST /v1/completions         a text continued

Both POSTs stream with "stream": true, as server-sent events in OpenAI's chunk format ending with
`data: [DONE]`. Requests are read and checked by llmlab.openai_api.

Scheduling, for now: one request at a time. The engine is not thread-safe (a model, its caches and its
compiled decoders are shared state), so every call into it runs on one worker thread, and a request
holds the engine's turn (an asyncio.Lock, which wakes its waiters first come, first served) from its
first token to its last. The event loop stays free meanwhile: it checks, queues and answers the other
requests, and sends each token as it comes. A client that goes away gives up its turn at the next
token. The next step is continuous batching: decode the running requests together, one row each, and
let a new request join the batch between two steps instead of waiting for the whole of the one before.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .errors import LlmlabError
from .generate import stream_text
from .llm import LLM, sampling_params
from .openai_api import (ApiError, MAX_BODY_BYTES, Request, error_from, parse_body, parse_request, stop_cut,
                         too_large, usage)


def model_name(llm: LLM) -> str:
    """The id clients ask for: a preset's "preset:NAME", else the file or folder name up to its first dot
    (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct)."""
    return llm.source if llm.source.startswith("preset:") else Path(llm.source).name.split(".")[0]


class Completion:
    """One request's generation, stepped on the engine's thread: text with its stop strings cut off,
    the tokens counted, and why it finished."""

    def __init__(self, llm: LLM, prompt_ids: list[int], request: Request):
        tok = llm.tokenizer
        self.eos_id, self.stop = tok.eos_id, request.stop
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.finish_reason: str | None = None
        self.last_id = None
        self.ids = llm.generate_ids(prompt_ids, request.max_tokens, **request.sampling)
        self.pieces = stream_text(tok.token_bytes, self.counted(self.ids), tok.special_ids)
        self.text, self.sent = "", 0

    def counted(self, ids):
        for token_id in ids:
            self.completion_tokens += 1
            self.last_id = token_id
            yield token_id

    def next_text(self) -> str | None:
        """The next text that can be sent ("" while a possible stop string is held back), or None at the end."""
        if self.finish_reason is not None:
            return None
        piece = next(self.pieces, None)
        if piece is not None:
            self.text += piece
            stop_at, ready = stop_cut(self.text, self.stop)
            if stop_at is None:
                return self.take(ready)
            self.finish_reason = "stop"
            self.close()                                    # no token more than the stop string needed
            return self.take(stop_at)
        self.finish_reason = "stop" if self.last_id == self.eos_id else "length"
        return self.take(len(self.text))

    def take(self, end: int) -> str:
        text, self.sent = self.text[self.sent:end], end
        return text

    def close(self) -> None:
        self.ids.close()


def create_app(llm: LLM) -> FastAPI:
    name = model_name(llm)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmlab-engine")
    turn = asyncio.Lock()
    app = FastAPI(title="llmlab", docs_url=None, redoc_url=None, openapi_url=None)

    async def on_engine(fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

    async def generation(http: HttpRequest, prompt_ids: list[int], request: Request) -> AsyncIterator[tuple]:
        """(text, completion) for each piece, in the engine's turn, until the end or until the client is gone."""
        async with turn:
            completion = await on_engine(Completion, llm, prompt_ids, request)
            try:
                while (text := await on_engine(completion.next_text)) is not None:
                    if await http.is_disconnected():
                        return
                    yield text, completion
            finally:
                # Not awaited: a cancelled task may not wait again. The one worker runs it before any
                # later request's work, and the generator is closed before its next step.
                worker.submit(completion.close)

    async def complete(http: HttpRequest, endpoint: str) -> JSONResponse | StreamingResponse:
        request = parse_request(await read_body(http), endpoint, name)
        tok = llm.tokenizer
        if endpoint == "chat":
            encode = lambda max_tokens: tok.encode_chat(request.prompt, add_generation_prompt=True, max_tokens=max_tokens)
        else:
            encode = lambda max_tokens: tok.encode(request.prompt, max_tokens=max_tokens)
        prompt_ids = await on_engine(prompt_of, encode, request)
        chunk = chunk_maker(endpoint, name)
        if not request.stream:
            texts, completion = [], None
            async for text, completion in generation(http, prompt_ids, request):
                texts.append(text)
            if completion is None:                         # the client left before the first token
                return JSONResponse({}, status_code=499)
            return JSONResponse(chunk("".join(texts), completion.finish_reason, whole=True)
                                | {"usage": usage(completion.prompt_tokens, completion.completion_tokens)})

        async def events() -> AsyncIterator[str]:
            if endpoint == "chat":
                yield sse(chunk("", None, role=True))
            completion = None
            async for text, completion in generation(http, prompt_ids, request):
                if text:
                    yield sse(chunk(text, None))
                if completion.finish_reason is not None:
                    yield sse(chunk("", completion.finish_reason))
            if completion is not None and request.include_usage:
                yield sse(chunk(None, None) | {"choices": [],
                                               "usage": usage(completion.prompt_tokens, completion.completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def prompt_of(encode, request: Request) -> list[int]:
        sampling_params(request.sampling)          # a bad temperature or seed is refused before any work
        return llm.encode_prompt(encode, request.max_tokens)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

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


def chunk_maker(endpoint: str, model: str) -> Callable[..., dict]:
    """A function that makes this response's JSON objects: one id and time for all its chunks."""
    prefix, kind = ("chatcmpl", "chat.completion") if endpoint == "chat" else ("cmpl", "text_completion")
    id, created = f"{prefix}-{secrets.token_hex(12)}", int(time.time())

    def chunk(text: str | None, finish_reason: str | None, whole: bool = False, role: bool = False) -> dict:
        if endpoint == "completions":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        elif whole:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            delta = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        object = kind if whole or endpoint == "completions" else f"{kind}.chunk"
        return {"id": id, "object": object, "created": created, "model": model, "choices": [choice]}
    return chunk


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, on_ready: Callable[[str], None] = print) -> None:
    """Serve until interrupted. The socket is bound here, so that port 0 (any free port) can be reported:
    on_ready gets the API's base URL once the server accepts connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise LlmlabError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port (0: any free one)") from None
    bound_host, bound_port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(llm), log_level="warning", timeout_graceful_shutdown=5))

    async def run() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
            on_ready(f"http://{shown}:{bound_port}/v1")
        await serving

    asyncio.run(run())
