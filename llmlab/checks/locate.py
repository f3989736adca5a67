"""Find where a learner's implementation first leaves the engine's numbers, and say so in the reader's terms.

A check lists the operations of the mechanism in the order the model runs them, each as a `Step`: the
learner's tensor, the engine's tensor for the same operation, and a name for every dimension. The
check feeds each of the learner's operations the ENGINE's inputs (teacher forcing), so a mistake shows
up once, at the operation that makes it, instead of spreading to every later layer.

`locate(steps)` walks the steps in order and stops at the first one with a value outside the tolerance
of the engine tensor's dtype (`tolerance`). It draws a small heat map of |got - expected| for that step
and raises `StepFailed`, a `CheckFailed` that names the layer, the operation and the position
(the first wrong element, dimensions scanned in the order given) and carries them as attributes:

    locate(Step("q after RoPE", got=q_mine, expected=q_engine, dims=("head", "position", "channel"),
                layer=0, hint="pair x_i with x_(i+d/2)") for ... in ...)

Steps may be produced lazily (a generator): nothing after the first wrong step is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from . import CheckFailed


@dataclass
class Step:
    """One operation to compare: the learner's tensor `got` and the engine's `expected`, of the same shape."""
    operation: str                    # in the notebook's words: "scores", "after mask", "q after RoPE"
    got: torch.Tensor
    expected: torch.Tensor
    dims: tuple[str, ...]             # one name per dimension: ("head", "query position", "key position")
    layer: int | None = None          # counted from 0, as in llm.model.layers; None: not a layer's operation
    hint: str = ""                    # what usually goes wrong here, without giving the answer away

    @property
    def where(self) -> str:
        return self.operation if self.layer is None else f"layer {self.layer} · {self.operation}"


class StepFailed(CheckFailed):
    """The first step whose values leave the tolerance: `layer`, `operation`, and `position`, a dict
    {dimension name: index} of the first wrong element (None where the shapes already differ)."""

    def __init__(self, message: str, step: Step, position: dict[str, int] | None):
        super().__init__(message)
        self.layer, self.operation, self.position = step.layer, step.operation, position


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for comparing a right implementation with the engine in `dtype`.

    Two right implementations differ only by rounding. Where they round to `dtype` at different
    places, that costs a few of its machine epsilons (4 allowed: bf16 ~3e-2, fp16 ~4e-3). Sums are
    accumulated in fp32 in every dtype (PyTorch's matmuls and reductions do), where adding up to a few
    thousand terms in another order costs up to ~sqrt(n) fp32 epsilons: 64 of them (~8e-6).
    Exact types (bool, integers) have tolerance 0.
    """
    if not dtype.is_floating_point:
        return 0.0
    return max(4 * torch.finfo(dtype).eps, 64 * torch.finfo(torch.float32).eps)


def wrong_elements(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Bool, True where |got - expected| > tol * (|expected| + RMS(expected)).

    The RMS term covers values near zero that are sums of large terms (rounding follows the terms'
    size, not the result's). Equal infinities (a masked score) agree; inf against a number does not.
    """
    if not expected.dtype.is_floating_point:
        return got.to(expected.dtype) != expected
    relative = tolerance(expected.dtype)               # from the engine's dtype, before widening to compare
    got, expected = got.double(), expected.double()
    finite = torch.isfinite(expected)
    scale = expected[finite].pow(2).mean().sqrt() if finite.any() else torch.tensor(0.0, dtype=torch.float64)
    tol = relative * (expected.abs().nan_to_num(posinf=0.0) + scale)
    same = (got == expected) | (got.isnan() & expected.isnan())          # covers equal infinities
    return ~same & ~((got - expected).abs() <= tol)


def _position(step: Step, index: tuple[int, ...]) -> str:
    return ", ".join(f"{name} {i}" for name, i in zip(step.dims, index))


def _number(x: torch.Tensor) -> str:
    return str(bool(x)) if x.dtype == torch.bool else f"{x.item():.6g}"


def _failure(step: Step, wrong: torch.Tensor) -> StepFailed:
    index = tuple(int(i) for i in wrong.nonzero()[0])
    message = (f"{step.where}: first wrong at {_position(step, index)}: got {_number(step.got[index])}, "
               f"expected {_number(step.expected[index])} ({int(wrong.sum())} of {wrong.numel()} values wrong"
               f"{_tolerance_words(step.expected.dtype)}).")
    if step.got.dtype != step.expected.dtype:
        message += f" Your tensor is {step.got.dtype}, the engine's {step.expected.dtype}."
    if step.hint:
        message += f" {step.hint}"
    return StepFailed(message, step, dict(zip(step.dims, index)))


def _tolerance_words(dtype: torch.dtype) -> str:
    tol = tolerance(dtype)
    return f"; tolerance {tol:.0e} relative, for {str(dtype).removeprefix('torch.')}" if tol else ""


def draw_error(step: Step, position: dict[str, int]) -> None:
    """Heat map of |got - expected| over the last two dimensions of `step`, at the first wrong element's
    index in the others; the first wrong element is circled. Grey: an infinity or NaN on one side only."""
    import matplotlib.pyplot as plt

    index = tuple(position[name] for name in step.dims)
    lead, got, expected = index[:-2], step.got, step.expected
    if expected.dim() == 1:
        got, expected, lead, index = got[None], expected[None], (), (0,) + index
    error = (got[lead].double() - expected[lead].double()).abs()
    error[got[lead] == expected[lead]] = 0.0                  # equal infinities: no error
    error[~torch.isfinite(error)] = float("nan")
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(error.cpu().numpy(), cmap=cmap, aspect="auto", interpolation="nearest")
    ax.plot(index[-1], index[-2], "o", markersize=10, markerfacecolor="none", markeredgecolor="red")
    rows, columns = (step.dims[-2:] if step.got.dim() > 1 else ("", step.dims[-1]))
    ax.set_ylabel(rows)
    ax.set_xlabel(columns)
    at = f" at {_position(step, lead)}" if lead else ""
    ax.set_title(f"|got − expected|: {step.where}{at}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    plt.show()
    plt.close(fig)


def locate(steps: Iterable[Step], draw: bool = True) -> int:
    """Compare the steps in order; at the first one outside tolerance, draw its error (if `draw`) and
    raise `StepFailed`. Returns the number of steps compared when all agree."""
    compared = 0
    for step in steps:
        if not isinstance(step.got, torch.Tensor):
            raise StepFailed(f"{step.where}: expected a tensor, your function returned "
                             f"{type(step.got).__name__}.", step, None)
        if tuple(step.got.shape) != tuple(step.expected.shape):
            raise StepFailed(f"{step.where}: expected shape {tuple(step.expected.shape)} "
                             f"({', '.join(step.dims)}), got {tuple(step.got.shape)}. {step.hint}".rstrip(),
                             step, None)
        wrong = wrong_elements(step.got.detach(), step.expected.detach())
        if wrong.any():
            failure = _failure(step, wrong)
            if draw:
                draw_error(step, failure.position)
            raise failure
        compared += 1
    return compared
