"""The roofline's arithmetic, its measured ceilings, and the bench modes built on it (contexts, roofline).

Speeds are not asserted (benchmarks are not tests); what is asserted is the roofline law itself, that
each stage is placed with its own FLOPs, bytes and time, and that the reports hold what they promise.
"""

import statistics
import subprocess
import sys
import time

import pytest
import torch

from llmlab.options import EngineOptions
from llmlab.profile import StageCost
from llmlab.roofline import Peaks, measure_peaks, place_stages


def test_attainable_is_the_lower_of_the_two_ceilings():
    peaks = Peaks(flops=100e9, bandwidth=10e9, copy_bandwidth=9e9, method="")
    assert peaks.ridge == 10.0
    assert peaks.attainable(1.0) == 10e9          # memory bound: intensity x bandwidth
    assert peaks.attainable(10.0) == 100e9        # at the ridge both ceilings agree
    assert peaks.attainable(1000.0) == 100e9      # compute bound: flat


def test_each_stage_is_placed_with_its_own_flops_bytes_and_time():
    peaks = Peaks(flops=100e9, bandwidth=10e9, copy_bandwidth=9e9, method="")
    times = {"mlp": 0.5, "lm_head": 0.01, "embedding": 0.1, "python_overhead": 0.2}
    costs = {"mlp": StageCost(2e9, 1e9, 1e9),               # 1 FLOP/byte: memory bound
             "lm_head": StageCost(1e9, 5e6, 5e6),           # 100 FLOP/byte: compute bound
             "embedding": StageCost(0, 1e6, 1e6)}           # no arithmetic: not on a FLOP/s plot
    placed = place_stages(times, costs, peaks)
    assert set(placed) == {"mlp", "lm_head"}
    mlp, head = placed["mlp"], placed["lm_head"]
    assert mlp["achieved_flops"] == pytest.approx(4e9) and mlp["attainable_flops"] == pytest.approx(10e9)
    assert mlp["fraction_of_roof"] == pytest.approx(0.4) and mlp["bound"] == "memory"
    assert mlp["achieved_bandwidth"] == pytest.approx(4e9)
    assert head["attainable_flops"] == 100e9 and head["fraction_of_roof"] == pytest.approx(1.0)
    assert head["bound"] == "compute"


def test_measured_peaks_bound_what_a_single_matmul_reaches():
    """An independent matmul, timed here as measure_peaks times its own (the median of timed calls,
    so that a busy machine slows both alike), cannot beat the measured ceiling by more than timing
    noise (25 %)."""
    peaks = measure_peaks(torch.device("cpu"), torch.float32, runs=3)
    assert peaks.flops > 1e9 and 1e8 < peaks.bandwidth < 2e12 and peaks.copy_bandwidth > 1e8
    a = torch.randn(512, 512)
    seconds = median_seconds(lambda: a @ a)
    assert 2 * 512**3 / seconds <= 1.25 * peaks.flops


def median_seconds(fn, repeats=20):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_bench_reports_decode_by_context_and_the_roofline():
    from llmlab import bench    # here, not at the top: the roofline's own tests need no bench
    settings = bench.BenchSettings(prompt_tokens=16, new_tokens=3, runs=2, warmup=0)
    engine = EngineOptions(dtype="bf16")
    report = bench.run(None, engines=[engine], settings=settings, contexts=(8, 40), roofline=True, threads=1)
    by_context = report["decode_by_context"]
    assert list(by_context) == ["8", "40"]
    assert len(by_context["40"][engine.name()]["decode_tok_s"]) == 2
    roofline = report["roofline"]
    assert roofline["peaks"]["ridge_flop_per_byte"] == pytest.approx(
        roofline["peaks"]["flops"] / roofline["peaks"]["bandwidth"])
    # a decode step's MLP is a matrix-vector product: 2 FLOPs per weight of 2 bytes in bf16
    assert roofline["decode"]["mlp"]["intensity"] == pytest.approx(1.0, rel=0.01)
    assert roofline["prefill"]["mlp"]["intensity"] > 5 * roofline["decode"]["mlp"]["intensity"]
    assert roofline["profiler_overhead"]["plain_seconds_per_token"] > 0
    assert "decode after" in bench.format_table(report) and "ridge" in bench.format_table(report)


@pytest.mark.parametrize("value", ["128,abc", "0,512"])
def test_cli_refuses_bad_context_lengths(value):
    result = subprocess.run([sys.executable, "-m", "llmlab.cli", "bench", "--contexts", value],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: --contexts" in result.stderr and "Traceback" not in result.stderr
