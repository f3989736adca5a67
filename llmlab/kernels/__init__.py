"""Triton kernels, each file holding one kernel, its launcher and its PyTorch reference.

    from llmlab.kernels.softmax import softmax, softmax_reference

Without a CUDA GPU the kernels run in Triton's interpreter, on CPU tensors. The interpreter gets
bf16 arithmetic wrong (NumPy has no bfloat16), so CPU checks use fp32, and fp16 where tl.dot is
involved; bf16 is checked natively on a GPU.
"""

import os
import sys

import torch

# Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, and triton.language
# decorates its own helpers (tl.zeros, tl.sum, ...) as `import triton` runs: so the variable must be
# set before triton is first imported. This package imports no triton itself; its kernel modules do.
# The interpreter executes each program with NumPy on CPU tensors, so every kernel here also runs on
# a laptop. setdefault: a user's explicit choice (TRITON_INTERPRET=1 on a GPU, to debug) wins.
if not torch.cuda.is_available():
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        raise ImportError("triton was imported before llmlab.kernels on a machine without a CUDA GPU, so its "
                          "interpreter is off and no kernel can run: import llmlab.kernels first, or set "
                          "TRITON_INTERPRET=1 before importing triton")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter rather than compiled for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

