"""OpenAI's request and response shapes, checked and mapped to llmlab's: what `llmlab serve` reads and writes.

A request body becomes a `Request` (the engine's max_new_tokens, sampling keywords and stop strings)
or an `ApiError`, whose JSON is OpenAI's: {"error": {"message", "type", "param", "code"}}. Parameters
that would change the result and that llmlab does not implement are refused unless they hold their
neutral value, and unknown ones are refused as OpenAI refuses them, so no client gets a made-up result.
A reply is made of `chunk_maker`'s objects: whole, or streamed as server-sent events (`sse`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import validate
from .errors import LlmlabError

MAX_BODY_BYTES = 1 << 20       # 1 MiB: a prompt that fills SmolLM2's 8,192-token context is about 40 kB
DEFAULT_MAX_TOKENS = {"chat": 256, "completions": 16}    # llm.chat's default; OpenAI's for completions
SAMPLING = ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty")  # the last three: vLLM's extensions
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options")
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False, None),
           "top_logprobs": (0, None), "logit_bias": ({}, None), "echo": (False,), "best_of": (1, None),
           "suffix": (None, ""), "tools": ([], None), "tool_choice": ("none", "auto", None),
           "response_format": ({"type": "text"}, None)}
COMMON = ("model", "stream", "n", "stop", "max_tokens", "max_completion_tokens", *SAMPLING, *IGNORED, *NEUTRAL)
OWN = {"chat": ("messages",), "completions": ("prompt",)}
ROLE_ALIASES = {"developer": "system"}     # newer OpenAI clients send the system prompt as "developer"


class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Request:
    """One request in llmlab's terms. prompt: the messages (chat) or the text (completions)."""

    prompt: list[dict] | str
    max_tokens: int
    sampling: dict
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_body(data: bytes) -> dict:
    """The JSON object in a request body. Only UTF-8, as JSON's RFC 8259 requires of data sent between
    systems (json.loads would also guess UTF-16 and UTF-32)."""
    if len(data) > MAX_BODY_BYTES:
        raise too_large()
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}): send JSON in UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def too_large() -> ApiError:
    return ApiError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes", code="request_too_large")


def parse_request(body: dict, endpoint: str, model_name: str) -> Request:
    """body (from parse_body) of a /v1/chat/completions ("chat") or /v1/completions request -> Request."""
    unknown = sorted(body.keys() - {*COMMON, *OWN[endpoint]})
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string naming the model; this server has {model_name!r}", "model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {model_name!r}", "model",
                       "model_not_found")
    for name, allowed in NEUTRAL.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by llmlab serve; leave it out", name)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"n must be 1: llmlab serve makes one choice per request, got {body['n']!r}", "n")
    stream = optional(body, "stream", bool, False)
    options = optional(body, "stream_options", dict, {})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        validate.positive_int(max_tokens, "max_tokens")      # over the context: the engine's check, later
    seed = body.get("seed")
    if validate.is_int(seed) and not 0 <= seed < 2**63:      # another type: SamplingParams says so, later
        # OpenAI's API types the seed as an int64; llmlab's sampler takes none below 0
        raise ApiError(400, f"seed must be an integer from 0 to 2**63 - 1 (OpenAI's seed is an int64), got {seed}",
                       "seed")
    return Request(
        prompt=chat_messages(body) if endpoint == "chat" else completion_prompt(body),
        max_tokens=DEFAULT_MAX_TOKENS[endpoint] if max_tokens is None else int(max_tokens),
        sampling={name: body[name] for name in SAMPLING if body.get(name) is not None},
        stop=stop_strings(body.get("stop")), stream=stream, include_usage=options.get("include_usage") is True)


def optional(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(400, f"{name} must be a {kind.__name__} (JSON {'boolean' if kind is bool else 'object'}), "
                            f"got {value!r}", name)
    return value


def chat_messages(body: dict) -> list[dict]:
    """The messages as llmlab's chat template takes them: role and text only (a "name" is dropped), and
    content given as a list of text parts joined. llmlab.chat_template.check_messages checks the rest."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       "messages")
    checked = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{n}] must be an object, got {type(message).__name__}", f"messages[{n}]")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{n}].content: llmlab serve reads text parts only",
                               f"messages[{n}].content")
            content = "".join(p.get("text") for p in content)    # a text that is not a str fails the check
        checked.append({"role": ROLE_ALIASES.get(message.get("role"), message.get("role")), "content": content})
    return checked


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]          # what clients send for one prompt given as a batch of one
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (llmlab serve takes one prompt per request)", "prompt")
    return prompt


def stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, f"stop must be a non-empty string or a list of up to 4 of them, got {stop!r}", "stop")
    return tuple(stops)


def stop_cut(text: str, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """(where the first stop string in text starts, or None; how much of text can be sent now). Without
    a stop string, an end of text that could begin one is held back until the next piece says."""
    starts = [i for s in stops if (i := text.find(s)) >= 0]
    if starts:
        return min(starts), min(starts)
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return None, len(text) - held


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_from(e: LlmlabError) -> ApiError:
    """llmlab's own check of a value (a bad max_tokens, temperature, role; a prompt over the context)."""
    return ApiError(400, str(e))


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
    """One server-sent event. An error in the middle of a stream is sent as one too: its ApiError's body,
    which OpenAI's clients raise as an error."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
