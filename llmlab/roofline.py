"""The roofline: this machine's two ceilings, measured, and each stage of a generation placed under them.

A kernel that does F FLOPs while moving B bytes has arithmetic intensity I = F / B. It cannot run
faster than either ceiling:

    attainable FLOP/s = min(peak FLOP/s, I * peak bandwidth)

The two meet at the ridge point I* = peak FLOP/s / peak bandwidth. Below it a stage is memory bound
(decode's matrix-vector products, I ~ 1 FLOP/byte in bf16), above it compute bound (prefill's
matrix-matrix products, I ~ prompt length). Both ceilings are measured here with the operations the
model really runs, in the model's dtype: a large square matmul for FLOP/s, and a matrix-vector product
over a matrix far larger than any cache for bandwidth (a plain copy is reported beside it).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .profile import OVERHEAD, Profile, StageCost


def _seconds(fn, device: torch.device, runs: int) -> float:
    """Median seconds of fn() over `runs` calls after two untimed ones."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class Peaks:
    flops: float             # FLOP/s of an n x n x n matmul
    bandwidth: float         # bytes/s of a matrix-vector product reading a matrix much larger than cache
    copy_bandwidth: float    # bytes/s of a plain copy (read + write), for comparison
    method: str

    @property
    def ridge(self) -> float:
        """FLOP per byte where the two ceilings meet."""
        return self.flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        return min(self.flops, intensity * self.bandwidth)


@torch.inference_mode()
def measure_peaks(device: torch.device, dtype: torch.dtype, runs: int = 10) -> Peaks:
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    # 1 GiB on a GPU (50 MB of L2 on an H100), 256 MiB on a CPU: neither fits in any cache
    rows, cols = (32768, 16384) if cuda else (16384, 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    matmul_s = _seconds(lambda: a @ b, device, runs)
    del a, b
    w = torch.randn(rows, cols, device=device).to(dtype)
    x = torch.randn(cols, device=device).to(dtype)
    matvec_s = _seconds(lambda: w @ x, device, runs)
    copy = torch.empty_like(w)
    copy_s = _seconds(lambda: copy.copy_(w), device, runs)
    weight_bytes = w.numel() * w.element_size()
    method = (f"median of {runs} timed calls after 2 warm-up calls "
              f"({'CUDA events' if cuda else 'time.perf_counter'}), {dtype}, {torch.get_num_threads()} threads; "
              f"FLOP/s: {n}x{n} @ {n}x{n} matmul, 2n^3 FLOPs; bandwidth: ({rows}x{cols}) @ vector, counting "
              f"the matrix's {weight_bytes / 2**20:.0f} MiB once; copy: the same matrix copied, counting read + write")
    return Peaks(flops=2 * n**3 / matmul_s, bandwidth=weight_bytes / matvec_s,
                 copy_bandwidth=2 * weight_bytes / copy_s, method=method)


def place_stages(times: dict[str, float], costs: dict[str, StageCost], peaks: Peaks) -> dict[str, dict]:
    """Each stage that does arithmetic, under the roofline: its intensity, the FLOP/s it reached,
    what the roofline allows at that intensity, and which ceiling binds it."""
    placed = {}
    for name, seconds in times.items():
        cost = costs.get(name)
        if name == OVERHEAD or cost is None or cost.flops == 0 or seconds <= 0:
            continue
        achieved, roof = cost.flops / seconds, peaks.attainable(cost.intensity)
        placed[name] = {
            "seconds": seconds, "flops": cost.flops, "bytes": cost.bytes, "intensity": cost.intensity,
            "achieved_flops": achieved, "achieved_bandwidth": cost.bytes / seconds,
            "attainable_flops": roof, "fraction_of_roof": achieved / roof,
            "bound": "memory" if cost.intensity < peaks.ridge else "compute",
        }
    return placed


def roofline_report(profile: Profile, peaks: Peaks) -> dict:
    return {
        "peaks": {"flops": peaks.flops, "bandwidth": peaks.bandwidth, "copy_bandwidth": peaks.copy_bandwidth,
                  "ridge_flop_per_byte": peaks.ridge, "method": peaks.method},
        "prefill": place_stages(profile.prefill, profile.prefill_costs, peaks),
        "decode": place_stages(profile.decode, profile.decode_costs, peaks),
        "profile": {"prompt_len": profile.prompt_len, "decode_steps": len(profile.decode_steps),
                    "prefill_seconds": profile.prefill, "decode_seconds_per_token": profile.decode},
    }


def format_roofline(report: dict) -> str:
    p = report["peaks"]
    lines = [f"peaks   {p['flops'] / 1e9:,.0f} GFLOP/s matmul, {p['bandwidth'] / 1e9:,.1f} GB/s matrix-vector "
             f"({p['copy_bandwidth'] / 1e9:,.1f} GB/s copy); ridge at {p['ridge_flop_per_byte']:.1f} FLOP/byte",
             f"{'phase':<8} {'stage':<18} {'FLOP/B':>8} {'GFLOP/s':>9} {'GB/s':>7} {'% of roof':>9}  bound"]
    for phase in ("prefill", "decode"):
        for name, s in report[phase].items():
            lines.append(f"{phase:<8} {name:<18} {s['intensity']:>8.1f} {s['achieved_flops'] / 1e9:>9.1f} "
                         f"{s['achieved_bandwidth'] / 1e9:>7.1f} {100 * s['fraction_of_roof']:>9.1f}  {s['bound']}")
    return "\n".join(lines)
