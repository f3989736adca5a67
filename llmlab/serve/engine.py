"""The engine of `llmlab serve`: a Scheduler stepped on a thread of its own.

The model is not thread-safe, and one thread stepping the whole batch is what batching is: the model,
its KV block pool and the Scheduler (llmlab.serve.scheduler) belong to this thread. Other threads (the
server's event loop) only queue messages for it (submit, abort, stop) and receive what it delivers
(llmlab.server has the picture). `make_scheduler` sizes the scheduler serve runs, and
`check_serve_options` refuses the switches it cannot run.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import traceback
from collections.abc import Callable

from .. import validate
from ..errors import LlmlabError
from ..llm import LLM
from ..memory import check_fits
from ..options import EngineOptions
from .scheduler import Request as EngineRequest, Scheduler

# The default KV pool: room for this many tokens per running sequence, and for one sequence of the
# whole context up to LONGEST_DEFAULT tokens (a 128k-token context would make the default pool huge).
TOKENS_PER_SEQUENCE = 512
LONGEST_DEFAULT = 8192
STOP_TIMEOUT_S = 30             # how long shutdown waits for the step under way


def check_serve_options(options: EngineOptions) -> None:
    """Refuse the switches the scheduler cannot run, rather than ignore them."""
    refused = [
        (options.compile != "none" or options.steps_per_graph > 1 or options.kernels == "fused-decode",
         "compile, steps_per_graph and kernels='fused-decode' build the fixed-shape decode step of one "
         "generation (the scheduler's own fixed-shape step is cuda_graphs=True)"),
        (options.speculative != "none", "speculative decoding guesses and checks the tokens of one sequence"),
        (options.tp > 1, "tensor parallelism needs one process per device"),
        (options.kv_cache != "static", f"kv_cache={options.kv_cache!r} is the KV cache of one generation"),
    ]
    for is_set, why in refused:
        if is_set:
            raise LlmlabError(f"llmlab serve cannot run this switch: {why}. It runs every request through the "
                              f"continuous-batching scheduler: one forward over all running sequences per step "
                              f"(eager, or replayed from a CUDA graph with cuda_graphs), on one device, with their "
                              f"KV in the scheduler's block pool in the model's dtype. Leave the switch out "
                              f"(generate and bench take it)")


def make_scheduler(llm: LLM, max_running: int = 16, kv_blocks: int | None = None, block_size: int = 16,
                   token_budget: int = 256) -> Scheduler:
    """The scheduler serve runs, its KV pool checked to fit the device before it is allocated.
    kv_blocks None: room for TOKENS_PER_SEQUENCE tokens per running sequence, and at least one context."""
    check_serve_options(llm.options)
    validate.positive_int(max_running, "max_running")
    validate.positive_int(block_size, "block_size")
    if kv_blocks is None:
        n_tokens = max(max_running * TOKENS_PER_SEQUENCE, min(llm.config.max_seq_len, LONGEST_DEFAULT))
        kv_blocks = -(-n_tokens // block_size)
    validate.positive_int(kv_blocks, "kv_blocks")
    pool_bytes = llm.config.kv_cache_bytes(kv_blocks * block_size, bytes_per_value=llm.dtype.itemsize)
    check_fits(pool_bytes, llm.device, f"a KV pool of {kv_blocks} blocks of {block_size} tokens")
    return Scheduler(llm, kv_blocks, block_size, max_running, token_budget)


class EngineError(Exception):
    """The engine could not finish a request: its client gets a 500 with this message."""


class Engine:
    """A Scheduler stepped on a thread of its own (the module docstring has the picture).

    submit and abort may be called from any thread: they only queue a message. deliver(event) is
    called on the engine's thread with each new token id (an int), then once with the end: the finish
    reason ("stop" or "length"), or the exception that ended the request (LlmlabError: a request it
    could never run; EngineError: a failure). An aborted request hears nothing more.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()   # ("add", request, deliver), ("abort", id), ("stop",)
        self.consumers: dict[object, Callable] = {}          # request id -> deliver, until the request ends
        self.closed: str | None = None                       # why it takes no more requests, once it does not
        self.lock = threading.Lock()        # no submit may slip into the inbox after close's last look at it
        self.sequences_per_step = [0] * (scheduler.max_running + 1)   # how many steps ran n sequences
        self.n_aborted = 0
        self.thread = threading.Thread(target=self.run, name="llmlab-engine", daemon=True)
        self.thread.start()

    def submit(self, request: EngineRequest, deliver: Callable) -> None:
        with self.lock:
            if self.closed is None:
                self.inbox.put(("add", request, deliver))
                return
        deliver(EngineError(self.closed))

    def abort(self, request_id) -> None:
        self.inbox.put(("abort", request_id))

    def stop(self) -> None:
        """End every request not yet ended, and the thread, after the step under way."""
        self.inbox.put(("stop",))
        self.thread.join(STOP_TIMEOUT_S)

    def run(self) -> None:
        reason = "the server is shutting down"
        try:
            while self.read_inbox(wait=not self.scheduler.has_work):
                if self.scheduler.has_work:
                    self.step()
        except Exception as error:          # the engine's own fault: nothing it holds can be trusted now
            traceback.print_exc()
            reason = f"the engine stopped after an internal error ({type(error).__name__}: {error})"
        finally:
            self.close(reason)

    def read_inbox(self, wait: bool) -> bool:
        """Act on every message queued, first waiting for one if there is no work. False once told to stop."""
        try:
            message = self.inbox.get(block=wait)
            while message[0] != "stop":
                if message[0] == "add":
                    self.add(*message[1:])
                else:
                    self.drop(message[1])
                message = self.inbox.get_nowait()
            return False
        except queue.Empty:
            return True

    def add(self, request: EngineRequest, deliver: Callable) -> None:
        try:
            self.scheduler.add(request)
        except LlmlabError as error:        # a request it could never run: larger than the pool, a seed too big
            deliver(error)
        except Exception as error:          # add changes nothing before its checks pass: the engine goes on
            traceback.print_exc()
            deliver(EngineError(f"the engine could not queue this request ({type(error).__name__}: {error})"))
        else:
            self.consumers[request.id] = deliver

    def drop(self, request_id) -> None:
        """Abort a request now, unless it has ended meanwhile (its end and the abort may have crossed)."""
        if self.consumers.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)
            self.n_aborted += 1

    def step(self) -> None:
        try:
            step = self.scheduler.step()
        except Exception as error:
            self.fail_running(error)
            return
        self.scheduler.steps.clear()        # a server keeps counts, not a record of every step
        self.sequences_per_step[len(step.ran)] += 1
        for request_id, token in step.new_tokens.items():
            self.consumers[request_id](token)
        for request in step.finished:
            self.consumers.pop(request.id)(request.finish_reason)

    def fail_running(self, error: Exception) -> None:
        """A step raised: end every request that is not waiting (running, or lost by the failure) with the
        error, and free it. Waiting requests were not touched and stay queued. A failure that ends no
        request would only come back at the next step, and one that freeing cannot undo leaves the
        scheduler in doubt: either way the engine is broken, and run() ends everything."""
        traceback.print_exc()
        failure = EngineError(f"the engine failed while running this request ({type(error).__name__}: {error})")
        waiting = {r.id for r in self.scheduler.waiting}
        running = {r.id for r in self.scheduler.running}
        failed = [i for i in self.consumers if i not in waiting]
        if not failed:
            raise EngineError(f"a step failed with no request to blame ({type(error).__name__}: {error})") from error
        for request_id in failed:
            if request_id in running:
                self.scheduler.abort(request_id)
            self.consumers.pop(request_id)(failure)

    def close(self, reason: str) -> None:
        """Take no more requests, and end every one not yet ended with the reason."""
        with self.lock:
            self.closed = reason
        failure = EngineError(reason)
        with contextlib.suppress(queue.Empty):
            while True:
                message = self.inbox.get_nowait()
                if message[0] == "add":
                    message[2](failure)
        for deliver in self.consumers.values():
            deliver(failure)
        self.consumers.clear()

    def stats(self) -> dict:
        """What the engine is doing, read without stopping it: the numbers may be a step apart."""
        blocks, per_step = self.scheduler.blocks, list(self.sequences_per_step)
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks": blocks.n_blocks, "block_size": blocks.block_size, "kv_blocks_in_use": blocks.n_in_use,
                "steps": self.scheduler.n_steps,
                "sequences_per_step": {str(n): count for n, count in enumerate(per_step) if count},
                "requests_aborted": self.n_aborted, "prefix_cache_hit_rate": round(blocks.hit_rate, 4)}
