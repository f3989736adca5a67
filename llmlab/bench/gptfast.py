"""gpt-fast (github.com/pytorch-labs/gpt-fast) as a peer: its own model.py and generate.py, run on the
same shape as the llmlab model, with random bf16 weights on a CUDA GPU (speed does not depend on values).

gpt-fast is not part of llmlab and is never committed here. Export its files into the git-ignored
folder peers/gpt-fast, from a clone (or a bare mirror) of the repository:

    mkdir -p peers/gpt-fast
    git -C <gpt-fast clone> archive HEAD model.py generate.py tokenizer.py tp.py quantize.py | tar -x -C peers/gpt-fast
    git -C <gpt-fast clone> rev-parse HEAD > peers/gpt-fast/COMMIT

then `llmlab bench --device cuda --compare gpt-fast` (or `--gpt-fast-dir DIR` for another folder).
Its generate.py imports its tokenizer.py, which needs `sentencepiece` and `tiktoken` installed.

What runs is gpt-fast's own code, called as its generate() calls it: `prefill` (eager), then
`decode_n_tokens`, whose loop calls `decode_one_token` compiled with torch.compile(mode="reduce-overhead",
fullgraph=True) exactly as its main() compiles it, bumps the position tensor in place (`input_pos += 1`)
and clones each token, with no host work per step beyond launching the graph. Sampling: temperature 1
and no top-k (see SAMPLING), done on the GPU without a sync.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import LlmlabError
from .engines import sync, weight_bytes_per_token

DEFAULT_DIR = "peers/gpt-fast"
EXPORT = ("mkdir -p peers/gpt-fast && git -C <gpt-fast clone> archive HEAD model.py generate.py tokenizer.py tp.py quantize.py "
          "| tar -x -C peers/gpt-fast")
# gpt-fast's lightest sampling (its decode_one_token's defaults: temperature 1, no top-k): softmax, an
# exponential draw and an argmax on the GPU. llmlab's engines decode greedily (one argmax), so the peer
# does a few more small kernels per token than llmlab, not the full top-k sort of its main()'s defaults.
SAMPLING = {"temperature": 1.0, "top_k": None}
# What gpt-fast's generate.py sets in inductor's (process-wide) config when it is imported. Here they
# are put back right after the import and set only while gpt-fast's own calls run (its compile happens
# in its first call), so llmlab's compiles in the same process see inductor's defaults.
INDUCTOR_FLAGS = {"coordinate_descent_tuning": True, "triton.unique_kernel_names": True, "fx_graph_cache": True}
FUNCTORCH_FLAGS = {"enable_autograd_cache": True}
GPT_FAST_MODULES = ("model", "generate", "tokenizer")     # its files import each other by these top-level names
TP_MODULES = ("tp", "quantize")                           # its tensor parallelism (tp.py imports quantize.py)


def model_args(config: ModelConfig) -> dict:
    """gpt-fast's ModelArgs fields for the shape of an llmlab config. gpt-fast derives head_dim as
    dim // n_head, as llmlab does; its LM head is never tied to the embedding (the same bytes are read
    per token either way: the head's matrix, and one row of the embedding)."""
    return {"block_size": config.max_seq_len, "vocab_size": config.vocab_size, "n_layer": config.n_layers,
            "n_head": config.n_heads, "n_local_heads": config.n_kv_heads, "dim": config.dim,
            "intermediate_size": config.ffn_dim, "rope_base": config.rope_theta, "norm_eps": config.norm_eps}


@contextlib.contextmanager
def gpt_fast_flags():
    import torch._functorch.config
    import torch._inductor.config

    with torch._inductor.config.patch(INDUCTOR_FLAGS), torch._functorch.config.patch(FUNCTORCH_FLAGS):
        yield


def check_gpt_fast(folder: str | Path, device: torch.device) -> None:
    """A clear error, before any model is loaded, where gpt-fast cannot run."""
    if device.type != "cuda":
        raise LlmlabError(f"--compare gpt-fast runs on a CUDA GPU only (its decode step is a CUDA graph); "
                          f"this bench runs on {device}: add --device cuda")
    folder = Path(folder).resolve()
    if not all((folder / f"{name}.py").is_file() for name in GPT_FAST_MODULES):
        raise LlmlabError(f"--compare gpt-fast needs gpt-fast's {', '.join(n + '.py' for n in GPT_FAST_MODULES)} "
                          f"in {folder}; export them there with:  {EXPORT}")


def import_gpt_fast(folder: str | Path) -> tuple:
    """gpt-fast's model and generate modules from `folder`, imported under their own top-level names
    (as its files import each other) and left loaded: dynamo re-imports a compiled function's module by
    name. Inductor's config is put back as it was."""
    folder = Path(folder).resolve()
    import torch._functorch.config
    import torch._inductor.config

    # a patch to the values they have now puts them back on leaving, whatever generate.py sets
    inductor_now = {name: torch._inductor.config.get_config_copy()[name] for name in INDUCTOR_FLAGS}
    functorch_now = {name: getattr(torch._functorch.config, name) for name in FUNCTORCH_FLAGS}
    for name in GPT_FAST_MODULES + TP_MODULES:     # a module of the same name imported before is not gpt-fast's
        sys.modules.pop(name, None)
    saved_path = list(sys.path)          # generate.py appends a folder of its own to sys.path
    sys.path.insert(0, str(folder))
    try:
        with torch._inductor.config.patch(inductor_now), torch._functorch.config.patch(functorch_now):
            model, generate = importlib.import_module("model"), importlib.import_module("generate")
    except ImportError as e:
        raise LlmlabError(f"gpt-fast's generate.py could not be imported from {folder} ({e}); it imports its "
                          f"tokenizer.py, which needs:  pip install sentencepiece tiktoken") from None
    finally:
        # dynamo imports a traced function's module by name when it compiles it, so gpt-fast's modules
        # stay importable for the rest of the process: its folder stays on sys.path, its modules loaded
        sys.path[:] = [str(folder)] + [p for p in saved_path if p != str(folder)]
    return model, generate


class GptFastEngine:
    """gpt-fast's Transformer of the config's shape, random bf16 weights, decoded by its generate.py;
    `batch` copies of the prompt side by side, as its --batch_size does. Started by torchrun with more
    than one process, it splits the model with its own tp.py (apply_tp), as its main() does."""

    name = "gpt-fast"

    def __init__(self, folder: str | Path, config: ModelConfig, device: torch.device, max_seq_len: int, seed: int = 0,
                 batch: int = 1, world: int = 1):
        check_gpt_fast(folder, device)
        self.batch = batch
        self.folder = Path(folder)
        model_module, self.generate = import_gpt_fast(folder)
        self.device = device
        with torch.device("meta"):
            model = model_module.Transformer(model_module.ModelArgs(**model_args(config)))
        self.model = model.to(dtype=torch.bfloat16).to_empty(device=device).eval()
        generator = torch.Generator(device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():     # llmlab's random weights: N(0, 0.02), unit norms
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=generator)
        if world > 1:
            if not (Path(folder) / "tp.py").is_file():
                raise LlmlabError(f"gpt-fast's tensor parallelism is its tp.py (and quantize.py): export them too, "
                                  f"with:  {EXPORT}")
            importlib.import_module("tp").apply_tp(self.model)    # after its main()'s _load_model(use_tp=True)
        with torch.device(device):
            self.model.setup_caches(max_batch_size=batch, max_seq_length=max_seq_len)
        # as gpt-fast's main() does: `global decode_one_token; decode_one_token = torch.compile(...)`
        self.generate.decode_one_token = torch.compile(self.generate.decode_one_token, mode="reduce-overhead",
                                                       fullgraph=True)
        self.first_call_seconds = None

    def tokens_made(self, n: int) -> int:
        return n

    def commit(self) -> str | None:
        path = self.folder / "COMMIT"
        return path.read_text().strip() if path.is_file() else None

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """gpt-fast's generate(), up to its decode loop: the first token and the position tensor after it."""
        prompt = torch.tensor(ids, dtype=torch.int, device=self.device)    # as its encode_tokens makes it
        input_pos = torch.arange(0, len(ids), device=self.device)
        token = self.generate.prefill(self.model, prompt.view(1, -1).repeat(self.batch, 1), input_pos,
                                      **SAMPLING).clone()
        return token, torch.tensor([len(ids)], device=self.device, dtype=torch.int)

    @torch.no_grad()
    def prefill_seconds(self, ids: list[int]) -> float:
        prompt = torch.tensor(ids, dtype=torch.int, device=self.device)
        input_pos = torch.arange(0, len(ids), device=self.device)
        sync(self.device)
        start = time.perf_counter()
        self.generate.prefill(self.model, prompt.view(1, -1).repeat(self.batch, 1), input_pos, **SAMPLING)
        sync(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode_seconds(self, ids: list[int], n: int) -> float:
        with gpt_fast_flags():
            if self.first_call_seconds is None:     # compile, warm up and record the CUDA graph, untimed
                token, input_pos = self._prefill(ids)
                start = time.perf_counter()
                self.generate.decode_n_tokens(self.model, token.view(self.batch, -1), input_pos, max(n, 4), **SAMPLING)
                sync(self.device)
                self.first_call_seconds = time.perf_counter() - start
            token, input_pos = self._prefill(ids)
            sync(self.device)
            start = time.perf_counter()
            self.generate.decode_n_tokens(self.model, token.view(self.batch, -1), input_pos, n, **SAMPLING)
            sync(self.device)
            return time.perf_counter() - start

    @torch.no_grad()
    def decode_stepper(self, ids: list[int], n: int):
        """A function that makes n decode steps after a prefill made now: what the profiler watches."""
        with gpt_fast_flags():
            token, input_pos = self._prefill(ids)

        @torch.no_grad()
        def run():
            with gpt_fast_flags():
                self.generate.decode_n_tokens(self.model, token.view(self.batch, -1), input_pos, n, **SAMPLING)
        return run

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_token(self.model, self.model.tok_embeddings, buffers=False)
