"""From float weights to a few bits and back: the quantizers, as functions of tensors.

A weight matrix w (out, in) = (N, K) is cut into groups that share one scale. `per` says how:

    per="tensor"    one scale for the whole matrix                      scale (1, 1)
    per="channel"   one scale per output row (channel)                  scale (N, 1)
    per=32          one scale per 32 consecutive inputs of a row        scale (N, K/32)   (group-wise)

Smaller groups follow the weights' local size more closely (less error) at the cost of storing more
scales. The shape of the scale is all `dequantize` needs to know which group a weight belongs to.

symmetric     q = round(w / scale),  scale = max|w| / (2^(bits-1) - 1)     w ≈ q * scale
              q is signed: -127..127 for int8, -7..7 for int4. Zero is exact.
asymmetric    q = round((w - offset) / scale),  scale = (max w - min w) / (2^bits - 1),  offset = min w
              w ≈ q * scale + offset; q is unsigned: 0..255 for int8, 0..15 for int4. The whole range
              of q is used even when a group's weights are not centred on zero.
fp8 (e4m3)    q = float8(w / scale),  scale = max|w| / 448 (the largest e4m3 value)     w ≈ q * scale

Round to nearest makes every integer quantizer's error at most half a step: |w - deq(q(w))| <= scale/2
for each weight, with its own group's scale. fp8 rounds to 3 mantissa bits instead: a relative error of
at most 2^-4 where w / scale is a normal e4m3 number (|w / scale| >= 2^-6), and at most half the
subnormal spacing, 2^-10 * scale, below that.
"""

from __future__ import annotations

import torch

from ..errors import LlmlabError

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max   # 448.0


def grouped(w: torch.Tensor, per: str | int) -> torch.Tensor:
    """w (N, K) viewed as (rows, groups, group): one scale will be computed over each last axis."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise LlmlabError(f"quantize a weight matrix (out, in); got {type(w).__name__} of shape "
                          f"{tuple(getattr(w, 'shape', ()))}")
    if not w.isfinite().all():   # one NaN makes its group's scale NaN, and every q in the group a made-up 0
        raise LlmlabError(f"the weights hold NaN or infinity at {(~w.isfinite()).nonzero()[0].tolist()}: "
                          f"quantize finite weights")
    n, k = w.shape
    if per == "tensor":
        return w.reshape(1, 1, n * k)
    if per == "channel":
        return w.reshape(n, 1, k)
    if isinstance(per, bool) or not isinstance(per, int) or per <= 0:
        raise LlmlabError(f"per must be 'tensor', 'channel' or a group size (a positive integer), got {per!r}")
    if k % per:
        fits = [str(g) for g in (32, 64, 128, 256) if k % g == 0]
        hint = f"; {', '.join(fits)} would" if fits else ""
        raise LlmlabError(f"group size {per} does not divide the {k} inputs of a row "
                          f"(in_features must be a multiple of the group size){hint}")
    return w.reshape(n, k // per, per)


def check_bits(bits: int) -> None:
    if bits not in range(2, 9):
        raise LlmlabError(f"bits must be 2..8 (q is stored in one byte), got {bits!r}")


def nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group (or a constant one, for asymmetric) has a zero range: give it the smallest
    # positive scale, so that q is 0 and dequantizes exactly, instead of 0 / 0 = NaN.
    return scale.clamp(min=torch.finfo(torch.float32).tiny)


def quantize_symmetric(w: torch.Tensor, bits: int, per: str | int = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int8 in [-(2^(bits-1) - 1), 2^(bits-1) - 1], scale (rows, groups) float32.

    The range is kept symmetric (-127..127, not -128..127) so that both +max|w| and -max|w| fit
    without clipping: that is what keeps every error within scale / 2.
    """
    check_bits(bits)
    q_max = 2 ** (bits - 1) - 1
    groups = grouped(w.float(), per)                                   # (rows, groups, group)
    scale = nonzero(groups.abs().amax(dim=-1) / q_max)                 # (rows, groups)
    q = torch.round(groups / scale[..., None]).clamp(-q_max, q_max)
    return q.to(torch.int8).reshape(w.shape), scale


def quantize_asymmetric(w: torch.Tensor, bits: int, per: str | int = "channel"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) uint8 in [0, 2^bits - 1], scale and offset (rows, groups) float32.

    offset is each group's minimum, which q = 0 reproduces exactly. This is GGUF's Q4_1 (d = scale,
    m = offset) for bits=4, per=32.
    """
    check_bits(bits)
    q_max = 2 ** bits - 1
    groups = grouped(w.float(), per)
    offset = groups.amin(dim=-1)                                       # (rows, groups)
    scale = nonzero((groups.amax(dim=-1) - offset) / q_max)
    q = torch.round((groups - offset[..., None]) / scale[..., None]).clamp(0, q_max)
    return q.to(torch.uint8).reshape(w.shape), scale, offset


def quantize_fp8(w: torch.Tensor, per: str | int = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) float8_e4m3fn, scale (rows, groups) float32 = max|w| / 448.

    Scaling maps each group's largest weight onto e4m3's largest value, so none overflows; the clamp
    only catches a float32 rounding of w / scale a hair above 448, which e4m3fn would turn into NaN.
    """
    groups = grouped(w.float(), per)
    scale = nonzero(groups.abs().amax(dim=-1) / FP8_MAX)
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(w.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """q (N, K) of any of the formats above, scale and offset (rows, groups) -> w (N, K) float32.

    w = q * scale + offset, each weight with its group's scale: the scale's shape gives the grouping.
    """
    groups = q.float().reshape(scale.shape[0], scale.shape[1], -1)    # (rows, groups, group)
    w = groups * scale[..., None].float()
    if offset is not None:
        w = w + offset[..., None].float()
    return w.reshape(q.shape)
