"""Triton kernels, each file holding one kernel, its launcher and its PyTorch reference.

    from llmlab.kernels.softmax import softmax, softmax_reference

Without a CUDA GPU the kernels run in Triton's interpreter, on CPU tensors. The interpreter gets
bf16 arithmetic wrong (NumPy has no bfloat16), so CPU checks use fp32, and fp16 where tl.dot is
involved; bf16 is checked natively on a GPU.
"""

import os
import sys

import torch

def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter rather than compiled for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


_arrivals: dict = {}


def arrival_counters(kernel: str, device: torch.device, n: int) -> torch.Tensor:
    """n int32 counters at zero for `kernel`, whose programs count themselves in as they finish, so
    that the last to arrive does the final reduction, and set back to zero by it. Kept per kernel, device
    and size: a CUDA graph replays with the same memory, made at the first (eager) call, before capture."""
    key = (kernel, device, n)
    if key not in _arrivals:
        _arrivals[key] = torch.zeros(n, device=device, dtype=torch.int32)
    return _arrivals[key]


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on `device` may use programmatic dependent launch (PDL, Hopper and later): the
    next kernel in the stream starts while this one finishes, loads what no kernel writes (weights),
    then waits (griddepcontrol.wait) for the one before to complete before it reads that one's output."""
    return device.type == "cuda" and not interpreted() and torch.cuda.get_device_capability(device)[0] >= 9


# Without a CUDA GPU, `import llmlab` has already set TRITON_INTERPRET=1 (see llmlab/__init__.py): the
# interpreter executes each program with NumPy on CPU tensors, so every kernel here also runs on a
# laptop. Triton reads the variable once, on its first import: if triton came in before llmlab did,
# the interpreter is off and no kernel could run, so say so now rather than fail at the first launch.
if not torch.cuda.is_available() and "triton" in sys.modules and not interpreted():
    raise ImportError("triton was imported before llmlab on a machine without a CUDA GPU, so its interpreter "
                      "is off and no kernel can run: import llmlab first, or set TRITON_INTERPRET=1 before "
                      "importing triton")
