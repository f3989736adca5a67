"""The checks of notebook 07 accept right answers and refuse wrong ones with a message that says what is wrong."""

import pytest
import torch

from llmlab.checks import CheckFailed
from llmlab.checks.timeline import check_decode_ceiling, check_intensity, check_roofline_point
from llmlab.corpus import prompt_ids
from llmlab.profile import profile_generation
from llmlab.roofline import Peaks


@pytest.fixture(scope="module")
def prof(llm):
    return profile_generation(llm, prompt_ids(llm.tokenizer, 32), max_new_tokens=3, stop_ids=set())


@pytest.fixture(scope="module")
def peaks():
    # Peaks as measure_peaks reports them, chosen so that the ridge (10 FLOP/byte) falls between decode's
    # fp32 matmuls (about 0.5) and those of a 32-token prefill (about 16): both ceilings bind some stage.
    return Peaks(flops=2e11, bandwidth=2e10, copy_bandwidth=1e10, method="chosen for the test")


def roofline_point(flops, bytes_moved, seconds, peak_flops, bandwidth):
    intensity = flops / bytes_moved
    return (intensity, flops / seconds, min(peak_flops, intensity * bandwidth),
            "memory" if intensity * bandwidth < peak_flops else "compute")


def test_both_ceilings_bind(prof, peaks):
    from llmlab.roofline import place_stages
    bounds = {s["bound"] for times, costs in ((prof.prefill, prof.prefill_costs), (prof.decode, prof.decode_costs))
              for s in place_stages(times, costs, peaks).values()}
    assert bounds == {"memory", "compute"}


def test_right_answers_pass(llm, prof, peaks, capsys):
    check_intensity(lambda m, k, n, s: 2 * m * k * n / (s * (m * k + k * n + m * n)))
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    check_decode_ceiling(peaks.bandwidth / weight_bytes, llm.model, peaks.bandwidth)
    check_roofline_point(roofline_point, prof, peaks)
    assert capsys.readouterr().out.count("Correct") == 3


@pytest.mark.parametrize("wrong, advice", [
    (lambda f, b, t, pi, beta: (f / b, b / t, min(pi, f / b * beta), "memory"), "the bandwidth reached"),
    (lambda f, b, t, pi, beta: (f / b, f / t, max(pi, f / b * beta), "memory"), "not the higher"),
    (lambda f, b, t, pi, beta: (b / f, f / t, min(pi, f / b * beta), "memory"), "FLOPs per byte"),
    (lambda f, b, t, pi, beta: (*roofline_point(f, b, t, pi, beta)[:3], "memory"), "which ceiling is lower"),
    (lambda f, b, t, pi, beta: roofline_point(f, b, t, pi, beta)[:3], "return four things"),
])
def test_wrong_roofline_points_are_refused(prof, peaks, wrong, advice):
    with pytest.raises(CheckFailed) as failure:
        check_roofline_point(wrong, prof, peaks)
    assert advice in str(failure.value)


def test_wrong_intensity_and_ceiling_are_refused(llm):
    with pytest.raises(CheckFailed, match="2mkn FLOPs"):
        check_intensity(lambda m, k, n, s: m * k * n / (s * (m * k + k * n + m * n)))
    embed = llm.model.embed.weight
    untied = sum(p.numel() * p.element_size() for p in llm.model.parameters()) + embed.numel() * embed.element_size()
    with pytest.raises(CheckFailed, match="tied"):
        check_decode_ceiling(1e10 / untied, llm.model, 1e10)
