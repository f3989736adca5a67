"""Checks for the notebooks' exercises, one module per notebook, shared by each notebook and its solution.

Each check compares an answer with llmlab, PyTorch or an independent computation (never a stored
number), prints a note when the answer is still the placeholder None, and raises AssertionError with a
hint when it is wrong.
"""
