"""Time llmlab's Triton kernels on a CUDA GPU against PyTorch and against the copy-bandwidth ceiling.

    python -m llmlab.kernels.benchmark --json data/benchmarks/kernels-<gpu>.json

Memory-bound kernels (norms, SwiGLU, decode attention, GEMV) are judged in GB/s against a plain
device-to-device copy, the fastest any kernel can stream memory; compute-bound ones (matmul,
FlashAttention) in TFLOP/s against cuBLAS and PyTorch's SDPA. Each benchmark is recorded on its own:
one that fails leaves its error in the JSON and the others still run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import traceback

import torch
import torch.nn.functional as F

from ..quant.linear import scales_and_zeros

METHOD = ("median over 20 samples, each one CUDA-graph replay of several back-to-back calls (enough for "
          "~1 ms) timed with CUDA events and divided by the calls, after a warm-up that compiles the "
          "kernels (the 1 GiB copy is timed eagerly: see bench_copy); inputs of memory-bound benchmarks "
          "rotate through up to 8 copies totalling ~3x the L2 cache, so calls read from DRAM, not L2; "
          "GB/s = bytes that must move (read + write) / time; "
          "causal attention FLOPs = 2 * 2 * batch * heads * seq^2 * head_dim / 2")
REPS = 20


def time_ms(fn, arg_sets: list[tuple], reps: int = REPS, graph: bool = True) -> tuple[float, str]:
    """Median GPU milliseconds per call of fn(*args), args cycling through arg_sets; and how it was timed."""
    side = torch.cuda.Stream()                 # warm up off the default stream, as graph capture wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in arg_sets * 2:              # compiles the Triton kernels, sizes cuBLAS's workspace
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(*arg_sets[0])
    end.record()
    end.synchronize()
    # A kernel of a few microseconds launches slower from Python than it runs: timing calls one by
    # one would measure the launches. So each sample replays many calls captured in a CUDA graph.
    calls = min(200, math.ceil(1.0 / max(start.elapsed_time(end), 1e-3)))
    calls = math.ceil(calls / len(arg_sets)) * len(arg_sets)

    def eager():
        for i in range(calls):
            fn(*arg_sets[i % len(arg_sets)])
    run, how = eager, "eager"
    if graph:
        try:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                eager()
            run, how = cuda_graph.replay, "cuda-graph"
        except RuntimeError:                   # an op that cannot be captured: time the launches too
            torch.cuda.synchronize()
    run()
    samples = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples), how


def copies_for(bytes_per_set: int) -> int:
    """How many copies of the inputs make a working set of 3x the L2 cache (at most 8)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(8, math.ceil(3 * l2 / bytes_per_set)))


def gb_per_s(n_bytes: int, ms: float) -> float:
    return n_bytes / ms / 1e6


def bench_copy() -> dict:
    src = torch.empty(2**28, device="cuda", dtype=torch.float32)            # 1 GiB
    dst = torch.empty_like(src)
    # Not from a graph: captured, the copy becomes a graph memcpy node, which measured ~20% slower
    # than an eager copy_ on an H100 (2.4 vs 3.0 TB/s). At 1 GiB the launch time is negligible.
    ms, how = time_ms(lambda: dst.copy_(src), [()], graph=False)
    return {"bytes": 2 * src.nbytes, "ms": ms, "GB/s": gb_per_s(2 * src.nbytes, ms), "timing": how}


def bench_flash_attention() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .flash_attention import flash_attention

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v)

    rows = []
    for seq, n_kv_heads in [(1024, 32), (4096, 32), (16384, 32), (4096, 8), (16384, 8)]:
        row = {"batch": 1, "n_heads": 32, "n_kv_heads": n_kv_heads, "seq": seq, "head_dim": 128, "dtype": "bf16"}
        try:
            q = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, n_kv_heads, seq, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            flops = 2 * 2 * 32 * seq * seq * 128 / 2
            ours, how = time_ms(flash_attention, [(q, k, v)])
            row.update(triton_ms=ours, triton_tflops=flops / ours / 1e9, timing=how)
            # The same kernel on its pointer path (TMA off): what the descriptors add.
            pointers, _ = time_ms(functools.partial(flash_attention, tma=False), [(q, k, v)])
            row["triton_pointers_tflops"] = flops / pointers / 1e9
            row["max_abs_error_vs_sdpa"] = (flash_attention(q, k, v) - sdpa_flash(q, k, v)).abs().max().item()
            flash, _ = time_ms(sdpa_flash, [(q, k, v)])
            row.update(sdpa_flash_ms=flash, sdpa_flash_tflops=flops / flash / 1e9, ratio_vs_sdpa_flash=flash / ours)
            # Also PyTorch's own choice of backend (cuDNN on recent GPUs), for context.
            default, _ = time_ms(sdpa, [(q, k, v)])
            row.update(sdpa_default_ms=default, sdpa_default_tflops=flops / default / 1e9)
        except Exception as e:  # noqa: BLE001 -- one failed case must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def bench_decode_attention(copy_gbps: float | None) -> list[dict]:
    from .decode_attention import decode_attention

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    rows = []
    for length in (4096, 8192, 16384, 32768):
        row = {"batch": 1, "n_heads": 32, "n_kv_heads": 8, "cache_len": length, "head_dim": 128, "dtype": "bf16"}
        try:
            kv_bytes = 2 * 8 * length * 128 * 2                            # K and V, bf16
            sets = []
            for _ in range(copies_for(kv_bytes)):
                # K, V as views of a preallocated cache with room left, as a real decode step sees them.
                cache = torch.randn(2, 1, 8, length + 256, 128, device="cuda", dtype=torch.bfloat16)
                q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
                sets.append((q, cache[0, :, :, :length], cache[1, :, :, :length]))
            ours, how = time_ms(decode_attention, sets)
            row.update(kv_bytes=kv_bytes, triton_ms=ours, triton_gbps=gb_per_s(kv_bytes, ours), timing=how)
            if copy_gbps:
                row["ratio_vs_copy"] = row["triton_gbps"] / copy_gbps
            row["max_abs_error_vs_sdpa"] = (decode_attention(*sets[0]) - sdpa(*sets[0])).abs().max().item()
            theirs, _ = time_ms(sdpa, sets)
            row.update(sdpa_ms=theirs, sdpa_gbps=gb_per_s(kv_bytes, theirs), ratio_vs_sdpa=theirs / ours)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def bench_memory_bound(ours, theirs, tensors_per_set, bytes_moved: int, copy_gbps: float | None) -> dict:
    """Our fused kernel and the unfused PyTorch ops on the same inputs; both judged by the bytes the
    fused kernel must move (what the unfused ops move beyond that is their loss)."""
    sets = [tensors_per_set() for _ in range(copies_for(bytes_moved))]
    ours_ms, how = time_ms(ours, sets)
    theirs_ms, _ = time_ms(theirs, sets)
    row = {"bytes": bytes_moved, "triton_ms": ours_ms, "triton_gbps": gb_per_s(bytes_moved, ours_ms),
           "torch_ms": theirs_ms, "torch_gbps": gb_per_s(bytes_moved, theirs_ms),
           "speedup_vs_torch": theirs_ms / ours_ms, "timing": how}
    if copy_gbps:
        row["ratio_vs_copy"] = row["triton_gbps"] / copy_gbps
    return row


def bench_rms_norm_and_swiglu(copy_gbps: float | None) -> dict:
    from .rms_norm import rms_norm, rms_norm_reference, rms_norm_residual, rms_norm_residual_reference
    from .swiglu import swiglu

    rows, dim = 8192, 8192
    matrix = rows * dim * 2                                                 # bytes of one bf16 matrix

    def x_w():
        return (torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16),
                torch.randn(dim, device="cuda", dtype=torch.bfloat16))

    def x_r_w():
        x, w = x_w()
        return x, torch.randn_like(x), w

    def gate_up():
        return tuple(torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    cases = {
        "rms_norm": (rms_norm, rms_norm_reference, x_w, 2 * matrix),                       # read x, write y
        "rms_norm_residual": (rms_norm_residual, rms_norm_residual_reference, x_r_w, 4 * matrix),  # x, r -> y, h
        "swiglu": (swiglu, lambda g, u: F.silu(g) * u, gate_up, 3 * matrix),                # gate, up -> out
    }
    results = {}
    for name, (ours, theirs, make, n_bytes) in cases.items():
        try:
            results[name] = {"shape": [rows, dim], "dtype": "bf16",
                             **bench_memory_bound(ours, theirs, make, n_bytes, copy_gbps)}
        except Exception as e:  # noqa: BLE001
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def bench_matmul() -> dict:
    from .matmul import matmul, matmul_tma

    n = 4096
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * n**3
    ours, how = time_ms(matmul, [(a, b)])
    tma, _ = time_ms(matmul_tma, [(a, b)])
    theirs, _ = time_ms(torch.matmul, [(a, b)])
    expected = (a @ b).float()
    error = ((matmul(a, b).float() - expected).abs().max() / expected.abs().max()).item()
    tma_error = ((matmul_tma(a, b).float() - expected).abs().max() / expected.abs().max()).item()
    return {"m": n, "n": n, "k": n, "dtype": "bf16", "triton_ms": ours, "triton_tflops": flops / ours / 1e9,
            "triton_tma_ms": tma, "triton_tma_tflops": flops / tma / 1e9, "ratio_tma_vs_torch": theirs / tma,
            "torch_ms": theirs, "torch_tflops": flops / theirs / 1e9, "ratio_vs_torch": theirs / ours,
            "max_error_relative_to_max": error, "tma_max_error_relative_to_max": tma_error, "timing": how}


# The decode GEMVs of Llama-3-8B (q/k/v stacked, o, gate/up stacked, down; and one of gate, up alone)
# and of Llama-3.2-1B, as (N, K): y (1, N) = x (1, K) @ W.T.
INT4_SHAPES = [(14336, 4096), (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
               (3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]
INT4_GROUP = 128


def int4_sets(n: int, k: int, rows: int = 1):
    """Rotating int4 inputs of one shape (packed, scales, offsets and the kernel layout) and bf16 ones."""
    from .int4_gemv import prepare_int4

    group = INT4_GROUP
    int4_bytes = n * k // 2 + 2 * n * (k // group) * 2                     # packed + bf16 scales and offsets

    def int4_set():
        packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        scales = torch.rand(n, k // group, device="cuda", dtype=torch.bfloat16) * 0.02
        offsets = torch.randn(n, k // group, device="cuda", dtype=torch.bfloat16) * 0.1
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        return x, packed, scales, offsets, group, prepare_int4(packed, scales, offsets, group)

    def bf16_set():
        return (torch.randn(rows, k, device="cuda", dtype=torch.bfloat16),
                torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    return ([int4_set() for _ in range(copies_for(int4_bytes))], int4_bytes,
            [bf16_set() for _ in range(copies_for(n * k * 2))])


def int4_load_only(x, weights):
    """What the GEMV's layout costs to read alone: the same programs, loads and split, no arithmetic
    (the words are summed as integers so that the loads are not optimised away)."""
    import triton

    from .int4_gemv import gemv_config, sm_count
    n = weights.words.shape[1]
    block_n, _, split_k, warps = gemv_config(n, x.shape[1], weights.group_size, sm_count(x.device))
    sums = torch.empty(split_k * n, device=x.device, dtype=torch.int32)
    load_only_kernel()[(triton.cdiv(n, block_n), split_k)](weights.words, sums, n, weights.words.shape[0] // split_k,
                                                         BLOCK_N=block_n, WORDS=weights.group_size // 8, num_warps=warps)
    return sums


@functools.cache
def load_only_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(words_ptr, sums_ptr, N, ROWS_PER_SPLIT, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
        ns = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        js = tl.arange(0, WORDS)
        total = tl.zeros((WORDS, BLOCK_N), dtype=tl.int32)
        first = tl.program_id(1) * ROWS_PER_SPLIT
        for j in range(first, first + ROWS_PER_SPLIT, WORDS):    # one group's words a step, as the GEMV
            total += tl.load(words_ptr + (j + js)[:, None] * N + ns[None, :])
        tl.store(sums_ptr + tl.program_id(1) * N + ns, tl.sum(total, axis=0))
    return kernel


def tinygemm_set(x, packed, scales, offsets, group):
    """The same int4 matrix for PyTorch's CUDA int4 kernel (tinygemm, the one gpt-fast's int4 uses):
    its own tiled packing of bytes whose HIGH nibble is the even column, and per group (scale, zero) with
    W = (q - 8) * scale + zero, so zero = offset + 8 * scale."""
    swapped = ((packed & 0xF) << 4) | (packed >> 4)
    tiled = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
    return x, tiled, group, scales_and_zeros(scales, offsets).to(x.dtype)


def bench_int4_gemv() -> list[dict]:
    """The int4 GEMV (and, for several rows, GEMM) against cuBLAS's bf16 F.linear on the same shape."""
    from .int4_gemv import int4_gemv, int4_matmul, int4_matmul_reference

    rows_out = []
    cases = [(n, k, 1) for n, k in INT4_SHAPES] + [(14336, 4096, m) for m in (2, 4, 8, 16)]
    for n, k, m in cases:
        row = {"rows": m, "weight": [n, k], "group_size": INT4_GROUP}
        try:
            sets, int4_bytes, bf16_sets = int4_sets(n, k, m)
            ours, how = time_ms(int4_matmul, sets)
            theirs, _ = time_ms(F.linear, bf16_sets)
            expected = int4_matmul_reference(*sets[0][:5]).float()
            error = ((int4_matmul(*sets[0]).float() - expected).abs().max() / expected.abs().max()).item()
            row.update(int4_us=ours * 1e3, int4_gbps=gb_per_s(int4_bytes, ours), bf16_linear_us=theirs * 1e3,
                       bf16_linear_gbps=gb_per_s(n * k * 2, theirs), speedup_vs_bf16=theirs / ours,
                       max_error_relative_to_max=error, timing=how)
            try:                           # the peer: PyTorch's tinygemm int4 kernel on the same weights
                tiny = [tinygemm_set(*one[:5]) for one in sets]
                tiny_error = ((torch.ops.aten._weight_int4pack_mm(*tiny[0]).float() - expected).abs().max()
                              / expected.abs().max()).item()
                tiny_ms, _ = time_ms(torch.ops.aten._weight_int4pack_mm, tiny)
                row.update(tinygemm_us=tiny_ms * 1e3, tinygemm_max_error_relative_to_max=tiny_error,
                           speedup_vs_tinygemm=tiny_ms / ours)
                del tiny
            except Exception as e:  # noqa: BLE001
                row["tinygemm_error"] = f"{type(e).__name__}: {e}"
            if m == 1:                     # the same kernel with the unpacking in plain Triton, not lop3 asm
                plain, _ = time_ms(lambda x, *rest: int4_gemv(x, rest[-1], asm=False), sets)
                floor, _ = time_ms(lambda x, *rest: int4_load_only(x, rest[-1]), sets)
                row.update(int4_plain_triton_us=plain * 1e3, load_only_us=floor * 1e3)
            del sets, bf16_sets
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        rows_out.append(row)
        torch.cuda.empty_cache()
    return rows_out


def sweep_int4_gemv() -> list[dict]:
    """Every (BLOCK_N, GROUPS_PER_STEP, SPLIT_K, num_warps) near gemv_config's choice, per decode shape:
    the data behind that choice."""
    from .int4_gemv import gemv_config, int4_gemv

    results = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, k in INT4_SHAPES:
        sets, _, bf16_sets = int4_sets(n, k)
        bf16, _ = time_ms(F.linear, bf16_sets)
        del bf16_sets
        times = {}
        grid = [(bn, per_step, split, 4) for bn in (32, 64) for per_step in (1, 2) for split in (1, 2, 4, 8, 16)]
        for config in [c for c in grid + [(32, 2, split, 2) for split in (1, 2, 4, 8, 16)]
                       if (k // INT4_GROUP) % (c[1] * c[2]) == 0]:
            ms, _ = time_ms(lambda x, *rest: int4_gemv(x, rest[-1], config=config), sets)
            times[str(config)] = ms * 1e3
        chosen = str(gemv_config(n, k, INT4_GROUP, sms))
        best = min(times, key=times.get)
        results.append({"weight": [n, k], "bf16_linear_us": bf16 * 1e3, "chosen": chosen, "chosen_us": times[chosen],
                        "best": best, "best_us": times[best], "us_by_config": times})
        print(results[-1]["weight"], chosen, f"{times[chosen]:.1f} us", best, f"{times[best]:.1f} us", flush=True)
        del sets
        torch.cuda.empty_cache()
    return results


def run_kernel_benchmarks(out_path=None, int4_sweep: bool = False) -> dict:
    """Run every benchmark on the current CUDA device; write the results as JSON to out_path if given."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "llmlab.kernels.benchmark needs a CUDA GPU and torch.cuda.is_available() is False. Without one "
            "the kernels run in Triton's CPU interpreter, which checks their results (tests/test_kernels.py) "
            "but whose timings mean nothing. Run this on a machine with an NVIDIA GPU and a CUDA build of torch.")
    import triton

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "cuda": torch.version.cuda, "method": METHOD}

    def record(name, fn, *args):
        try:
            results[name] = fn(*args)
        except Exception as e:  # noqa: BLE001 -- keep going: the other benchmarks are still worth having
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(f"{name}: {json.dumps(results[name], default=str)[:400]}", flush=True)
        torch.cuda.empty_cache()

    if int4_sweep:
        record("int4_gemv_sweep", sweep_int4_gemv)
        return write(results, out_path)
    record("copy", bench_copy)
    copy_gbps = results["copy"].get("GB/s")
    record("flash_attention", bench_flash_attention)
    record("decode_attention", bench_decode_attention, copy_gbps)
    record("rms_norm_swiglu", bench_rms_norm_and_swiglu, copy_gbps)
    record("matmul", bench_matmul)
    record("int4_gemv", bench_int4_gemv)
    return write(results, out_path)


def write(results: dict, out_path) -> dict:
    if out_path is not None:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--int4-sweep", action="store_true",
                        help="only time the int4 GEMV's launch configurations on every decode shape")
    args = parser.parse_args(argv)
    run_kernel_benchmarks(args.json, args.int4_sweep)


if __name__ == "__main__":
    main()
