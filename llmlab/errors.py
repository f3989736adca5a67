"""The one exception type llmlab raises for bad input.

Every message says what was wrong and how to fix it, so a reader never has to decode a traceback
from deep inside NumPy or PyTorch.
"""


class LlmlabError(ValueError):
    """Bad input to llmlab: a missing model, a corrupt file, an impossible setting."""
