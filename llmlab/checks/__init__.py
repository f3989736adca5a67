"""Checks for the notebooks' exercises, one module per notebook, shared by each notebook and its solution.

Each check compares an answer with llmlab, PyTorch or an independent computation (never a stored
number), prints a note when the answer is still the placeholder None, and raises AssertionError with a
hint when it is wrong.
"""


def unanswered(answer, name: str) -> bool:
    """True (after saying what to do) while an exercise's answer is still the placeholder None."""
    if answer is None:
        print(f"Fill in {name} above, then run this cell again.")
    return answer is None
