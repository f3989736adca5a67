"""How many kernels one decode step runs, and how many times the host had to launch something for it.

A small model's decode step is bound by launches, not bytes: every kernel costs a few microseconds of
fixed time on the GPU and ~5-20 µs of Python and dispatch on the host, whatever its size. Fusion cuts
the number of kernels; a CUDA graph cuts the host's launches to one per replay. Both are counted here
with torch.profiler over real decode steps of the model as loaded (eager, compiled or graphed):

    kernels      GPU kernels executed per step (CUDA), or operators run per step on a CPU: the aten
                 ops of eager PyTorch, or the compiled kernels inductor generated (each a C++ call)
    host_launches  calls into the CUDA runtime or driver that start work (kernel launches, graph
                 launches) per step: what the CPU has to do for one token. On a CPU: the same as kernels.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaGraphLaunch", "cuGraphLaunch")


WRAPPERS = ("Compiled", "## Call", "Wrapper", "Cache Lookup", "Pregraph")   # torch.compile's own frames


def _cpu_ops(events) -> int:
    """Operators called by the step itself, not from inside another operator; inside a compiled
    region, the calls its generated code makes (extern kernels such as oneDNN matmuls; the fused C++
    loops inductor writes are not recorded by the profiler, so a compiled CPU step counts low)."""
    children = {}
    for e in events:
        children.setdefault(id(e.cpu_parent), []).append(e)

    def calls(parent):
        return sum(calls(e) if any(w in e.name for w in WRAPPERS) else 1 for e in children.get(id(parent), []))
    return sum(calls(e) for e in events if e.name == "step")


@torch.inference_mode()
def launches_per_step(llm, prompt_len: int = 64, steps: int = 8) -> dict:
    """Kernels and host launches per decode step of `llm` with its switches, after a prompt of
    prompt_len random token ids; the decoder (compiled, captured) is warmed up first, untimed."""
    device = llm.device
    ids = torch.randint(0, llm.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    list(llm.generate_ids(ids, 2 * llm.options.steps_per_graph + 1, stop_ids=set()))      # warm up: compile, capture
    run = _stepper(llm, ids, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with torch.profiler.record_function("step"):
            n_tokens = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        launches = sum(1 for e in events if e.name in LAUNCH_CALLS)
    else:
        kernels = launches = _cpu_ops(events)
    return {"kernels_per_step": kernels / n_tokens, "host_launches_per_step": launches / n_tokens,
            "steps_counted": n_tokens, "method": f"torch.profiler over {n_tokens} decode steps after a "
            f"{prompt_len}-token prompt and a warm-up generation; "
            + ("kernels: CUDA kernel events; host launches: cudaLaunchKernel/cuLaunchKernel/cudaGraphLaunch calls"
               if device.type == "cuda" else "CPU: top-level operator calls (eager aten ops, or compiled kernels)")}


def _stepper(llm, ids: list[int], steps: int):
    """A function that runs at least `steps` decode steps (already prefilled) and returns how many it ran."""
    if llm.options.graph_ready:
        from .sampling import SamplingParams
        decoder = llm.decoder(SamplingParams(), len(ids) + steps + 1)
        decoder.start(torch.tensor([ids], device=llm.device), seed=0)
        calls = -(-steps // decoder.k)
        return lambda: [decoder.next_tokens() for _ in range(calls)] and calls * decoder.k
    from .generate import decode_one_token, prefill
    from .kv_cache import make_cache
    cache = make_cache(llm.options.kv_cache, llm.config, len(ids) + steps + 1, llm.dtype, llm.device)
    token = prefill(llm.model, torch.tensor([ids], device=llm.device), cache).argmax(-1, keepdim=True)

    def run():
        nonlocal token
        for i in range(steps):
            token = decode_one_token(llm.model, token, len(ids) + i, cache).argmax(-1, keepdim=True)
        return steps
    return run
