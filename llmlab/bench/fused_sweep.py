"""Time each fused decode kernel alone, for a grid of launch configs, on a GPU: where the defaults of
llmlab.kernels.fused_matvec.launch_config and fused_qkv come from.

    python -m llmlab.bench.fused_sweep smollm2-135m llama-3-8b --json sweep.json

Each config is launched 50 times inside one CUDA graph and replayed; the best of 5 replays, per launch,
is its time (µs). The same weight is reused by every launch, so a weight that fits in L2 (a small
model's) is read from there: compare configs with each other, not with the bandwidth. An empty kernel's
time is reported too: the floor one launch costs in a graph.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from ..config import PRESETS
from ..kernels.decode_attention import decode_attention_at_positions
from ..kernels.fused_matvec import matvec
from ..kernels.fused_qkv import qkv_rope_cache
from ..model import rope_table

BLOCK_ROWS, BLOCK_COLS, WARPS = (2, 4, 8, 16), (256, 512, 1024), (2, 4, 8)
CACHE_LEN, POSITION = 512, 300


def graph_microseconds(fn, launches: int = 50, replays: int = 5) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):                                   # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / launches)
    return best


@triton.jit
def empty_kernel(ptr):
    """Does nothing: its time in a CUDA graph is the floor one more launch costs."""


def best_configs(timings: dict, keep: int = 5) -> list:
    return sorted(timings.items(), key=lambda item: item[1])[:keep]


def sweep(name: str, dtype=torch.bfloat16) -> dict:
    c, results = PRESETS[name], {}
    x = torch.randn(1, c.dim, device="cuda", dtype=dtype)
    norm = torch.ones(c.dim, device="cuda", dtype=dtype)
    products = {"wo": (c.dim, c.n_heads * c.head_dim, False, False), "gate_up": (c.ffn_dim, c.dim, True, True),
                "down": (c.dim, c.ffn_dim, False, False), "head": (c.vocab_size, c.dim, True, False)}
    for part, (rows, cols, with_norm, glu) in products.items():
        weight = torch.randn(rows * (2 if glu else 1), cols, device="cuda", dtype=dtype) * 0.02
        vector = torch.randn(1, cols, device="cuda", dtype=dtype)
        timings = {}
        for block_n, block_k, warps in itertools.product(BLOCK_ROWS, BLOCK_COLS, WARPS):
            timings[f"{block_n},{block_k},{warps}"] = graph_microseconds(lambda: matvec(
                vector, weight, norm=norm if with_norm else None, eps=1e-5, glu=glu, block_n=block_n,
                block_k=block_k, num_warps=warps))
        results[part] = best_configs(timings)
    cos, sin = rope_table(c, "cuda")
    wqkv = torch.randn((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim, device="cuda", dtype=dtype) * 0.02
    k_cache = torch.zeros(1, c.n_kv_heads, CACHE_LEN, c.head_dim, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    pos = torch.tensor([POSITION], device="cuda")
    timings = {}
    for block_p, block_k, warps in itertools.product(BLOCK_ROWS, BLOCK_COLS, WARPS):
        if block_p <= c.head_dim // 2:
            timings[f"{block_p},{block_k},{warps}"] = graph_microseconds(lambda: qkv_rope_cache(
                x, norm, 1e-5, wqkv, cos, sin, pos, k_cache, v_cache, block_p=block_p, block_k=block_k, num_warps=warps))
    results["qkv"] = best_configs(timings)
    q = torch.randn(1, c.n_heads, c.head_dim, device="cuda", dtype=dtype)
    timings = {}
    for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4), (1, 3)):
        timings[f"{block_n},{warps},{stages}"] = graph_microseconds(lambda: decode_attention_at_positions(
            q, k_cache, v_cache, pos, block_n=block_n, num_warps=warps, num_stages=stages))
    results["attention"] = best_configs(timings)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+", choices=sorted(PRESETS))
    parser.add_argument("--json", help="write the five best configs of each kernel here")
    args = parser.parse_args()
    buffer = torch.zeros(1, device="cuda")
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "unit": "µs per launch",
              "config": "matvec: BLOCK_N,BLOCK_K,num_warps; qkv: BLOCK_P,BLOCK_K,num_warps; attention: "
                        "BLOCK_N,num_warps,num_stages",
              "empty_kernel": graph_microseconds(lambda: empty_kernel[(1,)](buffer))}
    for name in args.presets:
        report[name] = sweep(name)
        print(name, json.dumps(report[name]), flush=True)
        if args.json:                           # after each model: a long sweep cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
