"""Stage markers: the model's forward names its stages, and whoever listens can time them.

    with stage("qkv_projections"):
        q, k, v = attention.project_qkv(x)

By default nobody listens and `stage` returns one shared do-nothing context, so the markers cost a
function call each and change nothing: torch.compile traces straight through them. The profiler
(llmlab.profile) installs a listener for the length of one profiled run, so what it times is the
real forward under whatever switches the model has, never a copy of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

_NOTHING = contextlib.nullcontext()
_listener: Callable[[str], AbstractContextManager] | None = None


def stage(name: str) -> AbstractContextManager:
    """A context around one stage of the forward pass: the listener's, or one that does nothing."""
    return _NOTHING if _listener is None else _listener(name)


@contextlib.contextmanager
def listening(listener: Callable[[str], AbstractContextManager]):
    """Route every stage marker to `listener(name)` inside the `with` block (one listener at a time)."""
    global _listener
    if _listener is not None:
        raise RuntimeError("a stage listener is already installed: profiles cannot nest")
    _listener = listener
    try:
        yield
    finally:
        _listener = None
