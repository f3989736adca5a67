"""A chat template is code from a model file: render it so that no template can hang, exhaust memory
or reach outside the conversation it is given.

Three fences, each against what the one before it cannot stop:

1. Jinja's `ImmutableSandboxedEnvironment`: a template sees only the values it is given. Attributes
   that lead out of them (`''.__class__.__mro__`, a function's globals) and methods that change a list
   or a dict are refused.
2. A budget of time and memory. A loop is Python code and a string repeat (`'x' * 10**10`) is one C
   call: neither can be interrupted from inside the interpreter, but a process can always be stopped
   from outside. So the template is compiled and rendered in a forked child process under an
   address-space limit (RLIMIT_AS), which the parent kills when the time is up. Compiling happens there
   too, because Jinja evaluates constant expressions such as `'x' * 10**10` while it compiles.
3. A budget of output, counted piece by piece as the template produces it (`Template.generate`), so a
   template cannot print more than any conversation needs.

A fork costs about 10 ms, next to the seconds a reply takes. Where there is no fork (Windows) only
fences 1 and 3 stand.

`check_messages` checks what a template is given: {"role", "content"} dicts, known roles, text.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import time

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from . import validate
from .errors import LlmlabError

TIME_LIMIT_S = 1.0                 # real templates render in milliseconds
MEMORY_LIMIT_BYTES = 1 << 30       # what the render may allocate beyond what the process already maps
OUTPUT_LIMIT_CHARS = 1 << 24       # 16 M characters: more than a 131k-token context of text
ROLES = ("system", "user", "assistant")   # the turns SmolLM2 was trained on


def check_messages(messages) -> list[dict]:
    """A conversation as a chat template reads it: {"role", "content"} dicts, roles from ROLES, text content."""
    shape = 'messages must be a non-empty list of {"role": ..., "content": ...} dicts'
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LlmlabError(f"{shape}, got {type(messages).__name__}")
    checked = []
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.keys() != {"role", "content"}:
            keys = sorted(map(str, message)) if isinstance(message, dict) else type(message).__name__
            raise LlmlabError(f"{shape}; message {n} is {keys}")
        if message["role"] not in ROLES:
            raise LlmlabError(f"message {n} has the role {message['role']!r}; the roles are {', '.join(ROLES)}")
        content = validate.text(message["content"], f"message {n}'s content")
        checked.append({"role": message["role"], "content": content})
    return checked


def render_chat_template(source: str, **variables) -> str:
    """The template's text for `variables` (messages, add_generation_prompt, bos_token, ...), or an
    LlmlabError that says what the template did wrong."""
    if not hasattr(os, "fork"):
        return _outcome(_render(source, variables))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                       # the child: render, send the outcome, exit without cleanup
        try:
            os.close(read_end)
            _limit_memory()
            data = pickle.dumps(_render(source, variables))
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view):]
        finally:
            os._exit(0)                # never return into the parent's code (its tests, its atexit)
    os.close(write_end)
    try:
        data = _read_until(read_end, time.monotonic() + TIME_LIMIT_S)
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)   # a child that finished is only a zombie until waited for
        os.waitpid(pid, 0)
    if data is None:
        raise LlmlabError(f"the chat template ran for more than {TIME_LIMIT_S:g} s and was stopped: "
                          f"a template renders in milliseconds, so this one loops without end or nearly so. "
                          f"Use a model file with a sound template.")
    if not data:
        raise LlmlabError("the chat template's renderer died without an answer (it was killed, "
                          "perhaps for memory). Use a model file with a sound template.")
    return _outcome(pickle.loads(data))


def _outcome(outcome: tuple[str, str]) -> str:
    kind, text = outcome
    if kind == "error":
        raise LlmlabError(text)
    return text


def _read_until(fd: int, deadline: float) -> bytes | None:
    """Everything written to the pipe until the writer closes it, or None at the deadline."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _limit_memory() -> None:
    """Cap the child's address space at what it maps now (the parent's model and libraries, shared
    copy-on-write) plus the render's budget: an allocation past it is a MemoryError, not a dead machine."""
    with contextlib.suppress(ImportError, OSError, ValueError):     # no resource module or /proc: no cap
        import resource
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = mapped + MEMORY_LIMIT_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _render(source: str, variables: dict) -> tuple[str, str]:
    """("ok", text) or ("error", what went wrong, in words): only plain strings cross the pipe."""
    try:
        template = _environment().from_string(source)
        pieces, n_chars = [], 0
        for piece in template.generate(**variables):
            n_chars += len(piece)
            if n_chars > OUTPUT_LIMIT_CHARS:
                return "error", (f"the chat template produced more than {OUTPUT_LIMIT_CHARS:,} characters and "
                                 f"was stopped. Use a model file with a sound template.")
            pieces.append(piece)
        return "ok", "".join(pieces)
    except LlmlabError as e:            # the template's own raise_exception
        return "error", str(e)
    except jinja2.TemplateSyntaxError as e:
        return "error", (f"the chat template has a syntax error on line {e.lineno}: {e.message}. "
                         f"Use a model file with a sound template.")
    except SecurityError as e:
        return "error", f"the chat template tried something the sandbox forbids, and was stopped: {e}"
    except MemoryError:
        return "error", (f"the chat template asked for more than {MEMORY_LIMIT_BYTES / 2**30:g} GiB of memory "
                         f"and was stopped. Use a model file with a sound template.")
    except RecursionError:
        return "error", "the chat template nests or recurses too deeply, and was stopped."
    except Exception as e:              # the template's own bug: name it rather than show Jinja's traceback
        return "error", f"the chat template failed: {type(e).__name__}: {e}"


def _environment() -> ImmutableSandboxedEnvironment:
    def raise_exception(message):   # templates call this to reject a conversation they cannot render
        raise LlmlabError(f"the chat template rejected the conversation: {message}")

    # trim_blocks and lstrip_blocks are the settings Hugging Face renders with; without them
    # {% %} lines leave stray newlines.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env
