"""Where a tensor-parallel decode step's time goes: the collectives against everything else.

Run by `llmlab bench --tp N` on every rank (each rank profiles its own GPU). For each engine, one decode
call of `steps` tokens is profiled on the GPU (replayed graphs included: CUPTI sees the kernels inside
them) and its kernels are split into the collectives (NCCL's kernels, or the symmetric-memory ones) and
the rest. The bytes each rank puts into collectives per token are counted on an eager forward of one
token (llmlab.parallel.counting) and set beside the formula (llmlab.parallel.bytes_per_token).
"""

from __future__ import annotations

import shutil
import subprocess

import torch
from torch.profiler import ProfilerActivity, profile

from .. import parallel

COLLECTIVE_NAMES = ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "one_shot", "two_shot")


def is_collective(kernel_name: str) -> bool:
    name = kernel_name.lower()
    return any(word in name for word in COLLECTIVE_NAMES)


def kernel_time_per_step(run, steps: int, device: torch.device) -> dict:
    """GPU time per decode step of run() (which makes `steps` steps), in µs: collectives and the rest,
    and the five costliest collective kernels by name."""
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize(device)
    collective, other, by_name = 0.0, 0.0, {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time
        if is_collective(e.name):
            collective += us
            by_name[e.name] = by_name.get(e.name, 0.0) + us
        else:
            other += us
    top = dict(sorted(((name[:120], us / steps) for name, us in by_name.items()), key=lambda kv: -kv[1])[:5])
    return {"collective_us_per_step": collective / steps, "other_kernels_us_per_step": other / steps,
            "collective_kernels_us_per_step": top}


def interconnect() -> str | None:
    """`nvidia-smi topo -m`: how the GPUs are linked (NV18: 18 NVLinks; PIX/PHB/SYS: PCIe), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


@torch.inference_mode()
def tensor_parallel_report(timed: list, peers: list, ids: list[int], steps: int, device: torch.device) -> dict:
    """The collectives of each tensor-parallel engine: time per step (profiled) and bytes per token
    (counted and by formula)."""
    first = timed[0].llm
    shard = parallel.tensor_parallel_of(first.model)
    report = {"world": shard.world, "backend": torch.distributed.get_backend(shard.group),
              "interconnect": interconnect() if device.type == "cuda" else None, "engines": {}}
    with parallel.counting() as sent:
        first.logits(ids[:1])                         # one token through every layer, eagerly
    report["bytes_per_token_per_rank"] = {
        "counted": dict(sent),
        "formula": parallel.bytes_per_token(first.config, first.dtype.itemsize, shard.world),
        "formula_text": "all-reduce: (2 n_layers + 1) * dim * bytes (two per layer, one for the embedding); "
                        "all-gather: ceil(vocab / world) * bytes (this rank's logits)"}
    if device.type != "cuda":
        return report
    for engine in timed:
        decoder = engine.decoder(len(ids) + steps + engine.options.steps_per_graph)
        decoder.start(torch.tensor([ids] * engine.batch, device=device), seed=0)
        calls = -(-steps // decoder.k)
        report["engines"][engine.name] = kernel_time_per_step(
            lambda: [decoder.next_tokens() for _ in range(calls)], calls * decoder.k, device)
    for peer in peers:
        if hasattr(peer, "decode_stepper"):                # compiled and captured already, by the timed runs
            report["engines"][peer.name] = kernel_time_per_step(peer.decode_stepper(ids, steps), steps, device)
    return report
