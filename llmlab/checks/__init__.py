"""Checks for the notebooks' exercises, one module per notebook, shared by each notebook and its solution.

Each check compares an answer with llmlab, PyTorch or an independent computation (never a stored
number), prints a note when the answer is still the placeholder None, and raises `CheckFailed` with a
hint when it is wrong. Check functions are wrapped in `@check`, which turns their assertions into
`CheckFailed`: Jupyter then shows the advice alone, not a traceback through the check's own source
(which distracts, and can give the expected value away).
"""

import functools


class CheckFailed(AssertionError):
    """A wrong exercise answer: Jupyter shows its message and nothing else."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of formatting a traceback.
        return [f"\x1b[1;31mNot yet:\x1b[0m {self}"]


def check(function):
    """Wrap a check so that a failed assertion in it reaches the learner as a short `CheckFailed`."""
    @functools.wraps(function)
    def checked(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except CheckFailed:
            raise
        except AssertionError as error:
            raise CheckFailed(str(error)) from None
    return checked


def unanswered(answer, name: str) -> bool:
    """True (after saying what to do) while an exercise's answer is still the placeholder None."""
    if answer is None:
        print(f"Fill in {name} above, then run this cell again.")
    return answer is None
