"""Checks for the exercises of notebooks/07_inference_timeline.ipynb.

Expected answers come from the definition of a matmul's FLOPs and bytes worked out here term by term,
from the model's own parameters, and from `llmlab.roofline.place_stages` on the profile measured in the
notebook, never from a stored number.
"""

from __future__ import annotations

import math

import torch

from llmlab.roofline import place_stages

from . import check, unanswered


@check
def check_intensity(intensity) -> None:
    """`intensity(m, k, n, bytes_per_value)`: FLOP per byte of (m x k) @ (k x n), reading both inputs
    once and writing the output once."""
    if unanswered(intensity(1, 8, 8, 2), "intensity"):
        return
    shapes = [(1, 576, 1536, 2), (1, 576, 1536, 4), (512, 576, 1536, 2), (1, 4096, 14336, 2), (7, 33, 5, 1)]
    for m, k, n, s in shapes:
        flops = 2 * m * k * n                                  # one multiply and one add per term
        moved = s * (m * k + k * n + m * n)
        got = intensity(m, k, n, s)
        assert abs(got - flops / moved) <= 1e-9 * flops / moved, (
            f"intensity({m}, {k}, {n}, {s}) = {got}; expected {flops / moved:.4f}: 2mkn FLOPs over "
            f"{s}·(mk + kn + mn) bytes")
    print("Correct. A decode matvec in bf16 does about 1 FLOP per byte; 512 tokens at once about "
          f"{intensity(512, 576, 1536, 2):.0f}: the same weights, read once, used 512 times.")


@check
def check_decode_ceiling(answer, model: torch.nn.Module, bandwidth: float) -> None:
    """`answer`: the most tokens per second a batch-1 decode can reach if every weight is read once per
    token at `bandwidth` bytes/s (the memory roof; the KV cache and activations ignored)."""
    if unanswered(answer, "max_decode_tok_s"):
        return
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())   # a tied head: once
    expected = bandwidth / weight_bytes
    if model.config.tie_embeddings:
        twice = bandwidth / (weight_bytes + model.embed.weight.numel() * model.embed.weight.element_size())
        assert abs(answer - twice) > 1e-3 * twice, (
            "the LM head is tied to the embedding in SmolLM2: one matrix, read once per token, counted once")
    assert abs(answer - expected) <= 1e-3 * expected, (
        f"{answer:.1f} tok/s is not it: bandwidth ({bandwidth / 1e9:.1f} GB/s) / bytes of all the weights "
        f"({weight_bytes / 1e6:.0f} MB) = {expected:.1f} tok/s")
    print(f"Correct: at most {expected:.0f} tok/s from this machine's bandwidth; the bench measures what the "
          f"engine really reaches, and the gap is the time not spent streaming weights.")


# The same float64 operations as place_stages, perhaps in another order: a few ulps apart at most.
ROOFLINE_RTOL = 1e-9


@check
def check_roofline_point(roofline_point, prof, peaks) -> None:
    """`roofline_point(flops, bytes_moved, seconds, peak_flops, bandwidth)`: one stage's FLOPs and bytes
    (floats), its measured time in seconds, and the machine's peaks (FLOP/s, bytes/s) -> a tuple
    (intensity in FLOP/byte, achieved FLOP/s, attainable FLOP/s under the roofline, "memory" or
    "compute"). Compared with llmlab.roofline.place_stages for every stage of the measured profile."""
    if unanswered(roofline_point(1.0, 1.0, 1.0, peaks.flops, peaks.bandwidth), "roofline_point"):
        return
    n = 0
    for phase, times, costs in (("prefill", prof.prefill, prof.prefill_costs),
                                ("decode", prof.decode, prof.decode_costs)):
        for stage, want in place_stages(times, costs, peaks).items():
            where = f"{phase}, {stage} ({want['flops'] / 1e6:.3g} MFLOP, {want['bytes'] / 1e6:.3g} MB, " \
                    f"{want['seconds'] * 1e3:.3g} ms)"
            got = roofline_point(want["flops"], want["bytes"], want["seconds"], peaks.flops, peaks.bandwidth)
            assert isinstance(got, (tuple, list)) and len(got) == 4, (
                f"{where}: return four things, (intensity, achieved, attainable, bound), got {got!r}")
            intensity, achieved, attainable, bound = got
            close = lambda x, y: math.isclose(float(x), y, rel_tol=ROOFLINE_RTOL)
            assert close(intensity, want["intensity"]), f"{where}: intensity {intensity:.4g}: FLOPs per byte moved"
            if close(achieved, want["achieved_bandwidth"]):
                raise AssertionError(f"{where}: that is the bandwidth reached (bytes/s): the roofline's "
                                     "y-axis is FLOP/s")
            assert close(achieved, want["achieved_flops"]), f"{where}: achieved {achieved:.4g}: FLOPs over the time"
            if close(attainable, max(peaks.flops, want["intensity"] * peaks.bandwidth)):
                raise AssertionError(f"{where}: attainable {attainable:.4g}: the roofline is the lower of the "
                                     "two ceilings, not the higher")
            assert close(attainable, want["attainable_flops"]), (
                f"{where}: attainable {attainable:.4g}: the compute roof, or intensity × bandwidth below the ridge")
            assert bound == want["bound"], (
                f"{where}: you say {bound!r}; at {want['intensity']:.3g} FLOP/byte, with the ridge at "
                f"{peaks.ridge:.3g}, which ceiling is lower?")
            n += 1
    print(f"Correct: all {n} stages placed as llmlab.roofline places them, from this notebook's own measurements.")
