"""Students for distillation: smaller models that start from the teacher's own weights.

A shallower student keeps some of the teacher's transformer blocks and drops the rest:

    x_{l+1} = x_l + Block_l(x_l)      for the kept layers l only

Because every block only adds to the residual stream, skipping one leaves a model that still runs
and still roughly works; distillation then teaches the kept blocks to cover for the dropped ones.
The embedding, the final norm and the (tied) head are copied unchanged, so the student speaks the
teacher's vocabulary from step 0.

Which layers to keep: `evenly_spaced_layers` keeps the first and the last block and spreads the
rest evenly between them (DistilBERT kept every other layer). The first blocks turn token
embeddings into features and the last one turns features into next-token logits; layer-dropping
studies (Gromov et al. 2024, Men et al. 2024 "ShortGPT") find those the most costly to remove.

The structurally pruned student (fewer heads and MLP channels per layer) comes from
llmlab.compress.structured; the training loop (llmlab.compress.distill) takes either.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..config import LAYER_WIDTH_KEYS
from ..errors import LlmlabError
from ..llm import LLM, load, model_from_state_dict


def evenly_spaced_layers(n_layers: int, n_keep: int) -> list[int]:
    """n_keep layer indices out of 0..n_layers-1, the first and the last always among them.
    evenly_spaced_layers(30, 15) -> [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]."""
    if not 1 <= n_keep <= n_layers:
        raise LlmlabError(f"keep between 1 and {n_layers} layers, not {n_keep}")
    if n_keep == 1:
        return [n_layers - 1]
    return [round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep)]


def shallow_student(teacher: LLM, keep: Sequence[int], dtype: torch.dtype = torch.float32) -> LLM:
    """A new model made of the teacher's blocks `keep` (in that order), its embedding, final norm
    and head: copies in `dtype` on the teacher's device, so training it leaves the teacher as it was."""
    keep = [int(i) for i in keep]
    n = teacher.config.n_layers
    if not keep or sorted(set(keep)) != keep or not 0 <= keep[0] <= keep[-1] < n:
        raise LlmlabError(f"keep must be increasing, distinct layer indices in 0..{n - 1}, got {keep}")
    config = teacher.config
    per_layer = {field: tuple(getattr(config, field)[i] for i in keep)
                 for field in LAYER_WIDTH_KEYS if getattr(config, field) is not None}
    config = replace(config, n_layers=len(keep), **per_layer)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, weight in teacher.model.named_parameters():     # the tied head is listed once, as embed.weight
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            if int(layer) not in new_index:
                continue
            name = f"layers.{new_index[int(layer)]}.{rest}"
        state[name] = weight.detach().to(dtype=dtype, copy=True)
    model = model_from_state_dict(config, state, dtype, teacher.device)
    return LLM(model, teacher.tokenizer, f"{teacher.source} (layers {','.join(map(str, keep))})")


def make_student(spec: str, teacher: LLM) -> LLM:
    """The student a command line names: "half-depth" (evenly_spaced_layers, half the teacher's
    depth), "layers:0,2,4,..." (those teacher blocks), or a model llmlab.load reads (a folder saved
    by llmlab.hf.save_folder, e.g. a structurally pruned model), loaded in fp32."""
    n = teacher.config.n_layers
    if spec == "half-depth":
        return shallow_student(teacher, evenly_spaced_layers(n, n // 2))
    if spec.startswith("layers:"):
        try:
            keep = [int(i) for i in spec.removeprefix("layers:").split(",")]
        except ValueError:
            raise LlmlabError(f"write a list of layers as layers:0,2,4, not {spec!r}") from None
        return shallow_student(teacher, keep)
    if not Path(spec).exists():
        raise LlmlabError(f"unknown student {spec!r}: give half-depth, layers:0,2,4,..., or a saved model folder")
    student = load(spec, device=str(teacher.device))
    if student.config.vocab_size != teacher.config.vocab_size:
        raise LlmlabError(f"{spec} has a vocabulary of {student.config.vocab_size}, the teacher "
                          f"{teacher.config.vocab_size}: a student must share the teacher's tokens")
    return student


def student_dir(name: str) -> Path:
    """Where the student called `name` is saved and read back: $LLMLAB_CACHE/students/NAME, by
    default ~/.cache/llmlab/students/NAME. A cache, not the repository: a half-depth SmolLM2 student
    is 80M parameters (320 MB in fp32), too big to commit."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise LlmlabError(f"a student's name is a plain folder name like 'half-depth', not {name!r}")
    root = os.environ.get("LLMLAB_CACHE") or Path.home() / ".cache" / "llmlab"
    return Path(root) / "students" / name
