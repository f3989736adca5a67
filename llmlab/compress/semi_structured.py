"""2:4 semi-structured sparsity: in every 4 consecutive inputs of a weight row, 2 are zero.

For W (out, in), each group W[i, 4g : 4g+4] keeps its 2 highest-scoring weights (by |W_ij|, or by
Wanda's |W_ij|·‖X_j‖₂, see llmlab.compress.unstructured) and zeroes the other 2: sparsity 50%
exactly, in a pattern the hardware knows. NVIDIA GPUs since Ampere (compute capability 8.0) store
such a matrix compressed, the 2 kept values of each group plus 2-bit indices saying where they
were, and their sparse tensor cores multiply only those: half the multiplies, and in fp16/bf16 56%
of the weight bytes (2 values of 16 bits and 2 indices of 2 bits for every 4 weights), against the
dense matmul of the same zero-filled matrix.

On a CPU there is no such kernel: 2:4 pruning gives the same zeros in a dense matrix, and the same
speed. On a CUDA GPU, `to_sparse_2_4` converts a 2:4 weight with PyTorch's
`torch.sparse.to_sparse_semi_structured` backends (cuSPARSELt, or CUTLASS's kernels) and
`F.linear(x, sparse_weight)` runs it; `benchmark` times that against the dense `F.linear` at
Llama shapes:

    python -m llmlab.compress.semi_structured --json data/benchmarks/sparse_2_4_<gpu>.json

PyTorch's constraints: a 2-D contiguous CUDA weight in fp16 or bf16 (int8 and fp8 too, not used
here), both dimensions multiples of 16 (cuSPARSELt) or of 32 rows and 64 columns (CUTLASS). The
kernel computes sparse @ dense, so F.linear runs W · xᵀ and transposes back; an x with fewer rows
than the kernel's minimum (8 for fp16/bf16: one decoding token) is padded with zero rows inside the
call, whose outputs are dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from ..config import preset
from ..errors import LlmlabError
from ..model import Transformer
from .calibration import block_linears
from .unstructured import (CALIBRATION_TOKENS, apply_masks, calibration_norms, float_weights, keep_largest,
                           wanda_scores)

BACKENDS = {"cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
            "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS}
SPARSE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BENCH_PRESETS = ("llama-3.2-1b", "llama-3-8b")
BENCH_TOKENS = (1, 16, 2048)     # one sequence decoding, 16 decoding together, a prefill


def groups_of_4(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) viewed as (out, in / 4, 4): each row's consecutive groups of 4 inputs."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise LlmlabError(f"2:4 sparsity needs a weight (out, in) with in_features a multiple of 4; got "
                          f"{tuple(weight.shape)}")
    return weight.view(weight.shape[0], weight.shape[1] // 4, 4)


def mask_2_4(weight: torch.Tensor, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask (True = kept) with exactly 2 of every 4 consecutive inputs of each row: the 2 with the
    largest |W_ij|, or, given input_norm (in,), the largest Wanda score |W_ij|·‖X_j‖₂."""
    scores = weight.detach().abs() if input_norm is None else wanda_scores(weight, input_norm)
    return keep_largest(groups_of_4(scores), 2).view(weight.shape)


def prune_2_4(llm, score: str = "wanda", calibration_tokens: int = CALIBRATION_TOKENS) -> dict[str, int]:
    """Prune every block linear of a loaded LLM to 2:4 in place, by "wanda" or "magnitude" score;
    layer name -> weights pruned (half of each)."""
    if score not in ("wanda", "magnitude"):
        raise LlmlabError(f"2:4 keeps weights by 'wanda' or 'magnitude' score, not {score!r}")
    norms = calibration_norms(llm, calibration_tokens) if score == "wanda" else {}
    masks = {name: mask_2_4(weight, norms.get(name)) for name, weight in float_weights(llm.model).items()}
    return apply_masks(llm.model, masks)


def require_sparse_gpu(device: torch.device) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        where = f"this tensor is on {device}" if torch.cuda.is_available() else "this machine has no CUDA GPU"
        raise LlmlabError(f"the 2:4 sparse kernels (cuSPARSELt, CUTLASS) run on NVIDIA GPUs only, and {where}. "
                          f"On a CPU, 2:4 pruning (mask_2_4, prune_2_4) still gives the zeros, in a dense "
                          f"matrix, without a speed-up")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise LlmlabError(f"2:4 sparse tensor cores need compute capability 8.0 (Ampere) or newer; "
                          f"{torch.cuda.get_device_name(device)} is {major}.{minor}")


def to_sparse_2_4(weight: torch.Tensor, backend: str = "cusparselt") -> torch.Tensor:
    """A 2:4-pruned CUDA weight (out, in), fp16 or bf16, in the compressed form F.linear runs on the
    sparse tensor cores. The zeros must already be there (mask_2_4): the compression keeps 2 values
    of every 4, it does not choose them."""
    require_sparse_gpu(weight.device)
    if backend not in BACKENDS:
        raise LlmlabError(f"unknown 2:4 backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if weight.dtype not in SPARSE_DTYPES.values():
        raise LlmlabError(f"the 2:4 kernels here take fp16 or bf16 weights, not {weight.dtype}")
    if bool(((groups_of_4(weight) != 0).sum(-1) > 2).any()):
        raise LlmlabError("this weight is not 2:4 sparse (some group of 4 inputs has more than 2 non-zeros): "
                          "prune it with mask_2_4 first")
    return BACKENDS[backend].from_dense(weight.detach().contiguous())


def weight_shapes(preset_name: str) -> dict[tuple[int, int], list[str]]:
    """(out, in) -> the block linears of that shape, read off the preset's real model (built on the meta
    device: no memory), e.g. llama-3-8b: (14336, 4096) -> ["w_gate", "w_up"]."""
    with torch.device("meta"):
        model = Transformer(preset(preset_name))
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, linear in block_linears(model).items():
        if name.startswith("layers.0."):
            shapes.setdefault(tuple(linear.weight.shape), []).append(name.rsplit(".", 1)[1])
    return shapes


def median_ms(fn, warmup: int, repeats: int, calls: int, graph: bool = False) -> float:
    """Median over `repeats` of the GPU time of `calls` back-to-back calls (CUDA events), per call.
    graph: the calls are captured once in a CUDA graph and the graph is replayed, so the host's launch
    and set-up cost is not in the time: what is left is the kernels alone."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(calls):
                fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph:
            captured.replay()
        else:
            for _ in range(calls):
                fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_shape(out_features: int, in_features: int, tokens: int, dtype: torch.dtype, device: torch.device,
               warmup: int, repeats: int, calls: int) -> dict:
    """Dense F.linear against each 2:4 backend on one random 2:4 weight; the errors of the sparse results."""
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(out_features, in_features, device=device, generator=generator) * in_features ** -0.5
    weight = (weight * mask_2_4(weight)).to(dtype)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, generator=generator)
    dense = F.linear(x, weight)
    row = {"out_features": out_features, "in_features": in_features, "tokens": tokens,
           "dense_ms": median_ms(lambda: F.linear(x, weight), warmup, repeats, calls),
           "dense_graph_ms": median_ms(lambda: F.linear(x, weight), warmup, repeats, calls, graph=True), "sparse": {}}
    for backend in BACKENDS:
        try:
            sparse_weight = to_sparse_2_4(weight, backend)
            sparse = F.linear(x, sparse_weight)
            ms = median_ms(lambda: F.linear(x, sparse_weight), warmup, repeats, calls)
        except (RuntimeError, NotImplementedError) as e:     # e.g. CUTLASS's kernels are built for 8.x only
            row["sparse"][backend] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            continue
        try:
            graph_ms = median_ms(lambda: F.linear(x, sparse_weight), warmup, repeats, calls, graph=True)
            in_graph = {"graph_ms": graph_ms, "graph_speedup": row["dense_graph_ms"] / graph_ms}
        except RuntimeError as e:                           # a backend whose call cannot be captured
            in_graph = {"graph_error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        row["sparse"][backend] = {"ms": ms, "speedup": row["dense_ms"] / ms, **in_graph,
                                  "max_abs_error": (sparse.float() - dense.float()).abs().max().item(),
                                  "max_abs_output": dense.float().abs().max().item()}
    return row


def benchmark(device: str = "cuda", presets=BENCH_PRESETS, tokens=BENCH_TOKENS, dtypes=tuple(SPARSE_DTYPES),
              warmup: int = 10, repeats: int = 50, calls: int = 10) -> dict:
    """Dense against 2:4 sparse F.linear at each preset's block-linear shapes: a JSON-able dict."""
    dev = torch.device(device)
    require_sparse_gpu(dev)
    rows = []
    for preset_name in presets:
        for (out_features, in_features), names in weight_shapes(preset_name).items():
            for dtype in dtypes:
                for n in tokens:
                    row = time_shape(out_features, in_features, n, SPARSE_DTYPES[dtype], dev, warmup, repeats, calls)
                    rows.append({"preset": preset_name, "linears": names, "dtype": dtype, **row})
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return {
        "device": torch.cuda.get_device_name(dev),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cusparselt": cusparselt},
        "method": (f"y = F.linear(x, W) for x (tokens, in) and W (out, in) a random N(0, 1/in) matrix pruned to 2:4 "
                   f"by magnitude: dense W against W compressed by each backend's from_dense "
                   f"(torch.sparse.SparseSemiStructuredTensor{{CUSPARSELT,CUTLASS}}; cuSPARSELt with its default "
                   f"algorithm, not searched). Each time is the median over "
                   f"{repeats} repeats of {calls} back-to-back calls between two CUDA events, divided by {calls}, "
                   f"after {warmup} warm-up calls: the host's launch cost is inside where it exceeds the kernel's. "
                   f"graph_ms: the same {calls} calls captured once in a CUDA graph and replayed, median of "
                   f"{repeats} replays, per call: the kernels alone, without the host's per-call cost. "
                   f"One weight is reused, so one that fits in L2 is read from there. A 1-token x is padded by "
                   f"PyTorch to the kernel's minimum rows inside the call, and that is timed too. max_abs_error is "
                   f"the largest |sparse - dense| output difference: the kernels sum in different orders, so the "
                   f"two may differ by the dtype's rounding."),
        "results": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmlab.compress.semi_structured",
                                     description="Time 2:4 sparse against dense F.linear at Llama shapes (CUDA).")
    parser.add_argument("--json", metavar="PATH", help="write the report here")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        report = benchmark(repeats=args.repeats)
    except LlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in report["results"]:
        sparse = ", ".join(f"{name} {r['ms']:.4f} ms ({r['speedup']:.2f}x), in a graph "
                           + (f"{r['graph_ms']:.4f} ms ({r['graph_speedup']:.2f}x)" if "graph_ms" in r else "failed")
                           if "ms" in r else f"{name} failed" for name, r in row["sparse"].items())
        print(f"{row['preset']:>13} {'/'.join(row['linears']):<12} {row['out_features']:>5}x{row['in_features']:<5} "
              f"{row['dtype']} tokens {row['tokens']:>4}: dense {row['dense_ms']:.4f} ms "
              f"({row['dense_graph_ms']:.4f} in a graph), {sparse}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
