"""The shape of a Llama-family model, and named presets of real shapes for speed work."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Integral, Real

from .errors import LlmlabError


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: a value read from a file can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_count(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool) and v >= 1


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


MAX_LAYERS = 100_000     # real models have ~10-130


# What each field of ModelConfig must be, and why: a model file can hold anything, and a NaN or a
# negative number here would load and then compute nonsense instead of failing.
FIELD_RULES = {
    "vocab_size": (_is_count, "a positive integer", "the embedding's row count"),
    "dim": (_is_count, "a positive integer", "the residual stream's width"),
    # a cap where the count is read from a file: per-layer lists are this long
    "n_layers": (lambda v: _is_count(v) and v <= MAX_LAYERS, f"an integer from 1 to {MAX_LAYERS:,}",
                 "the number of blocks"),
    "n_heads": (_is_count, "a positive integer", "head_dim = dim // n_heads"),
    "n_kv_heads": (_is_count, "a positive integer", "the key/value heads"),
    "ffn_dim": (_is_count, "a positive integer", "the MLP's hidden width"),
    "max_seq_len": (_is_count, "a positive integer", "the context length"),
    "norm_eps": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0",
                 "RMSNorm divides by sqrt(mean(x^2) + eps)"),
    "rope_theta": (lambda v: _is_number(v) and v > 0, "a finite number > 0",
                   "RoPE's frequencies are theta^(-2i/head_dim)"),
    "tie_embeddings": (lambda v: isinstance(v, bool), "true or false", "whether the head reuses the embedding"),
}


def check_field(field: str, value, named: str | None = None) -> None:
    """Refuse a value of ModelConfig.`field` that breaks its rule; `named` says where it was read."""
    is_valid, rule, why = FIELD_RULES[field]
    if not is_valid(value):
        raise LlmlabError(f"{named or field} is {shown(value)}: it must be {rule} ({why})")


@dataclass(frozen=True)
class ModelConfig:
    """A model's shape. Every layer has the same widths unless the per-layer tuples say otherwise.

    Structured pruning (llmlab.compress.structured) removes whole MLP channels and attention heads,
    a different number in each layer: `layer_ffn_dims`, `layer_heads` and `layer_kv_heads` then give
    each layer's SwiGLU width and query / key-value head counts, and `ffn_dim_of(i)`, `heads_of(i)`,
    `kv_heads_of(i)` read them (the uniform value where a tuple is None). Heads keep their size:
    `n_heads` stays the unpruned model's query-head count, so head_dim = dim // n_heads is unchanged
    and each remaining head keeps its RoPE frequencies and its W_q, W_k, W_v rows as trained.
    """

    vocab_size: int = 49152
    dim: int = 576                 # width of the residual stream, d_model
    n_layers: int = 30
    n_heads: int = 9               # query heads (with layer_heads: the unpruned count, fixing head_dim)
    n_kv_heads: int = 3            # key/value heads; n_heads // n_kv_heads query heads share each (GQA)
    ffn_dim: int = 1536            # hidden width of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = True    # the LM head reuses the token embedding matrix
    layer_ffn_dims: tuple[int, ...] | None = None    # per layer, after structured pruning
    layer_heads: tuple[int, ...] | None = None       # query heads per layer
    layer_kv_heads: tuple[int, ...] | None = None    # key/value heads per layer

    def __post_init__(self):
        for field in FIELD_RULES:
            check_field(field, getattr(self, field))
        if self.dim % self.n_heads:
            raise LlmlabError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}): "
                              f"head_dim = dim // n_heads")
        if self.head_dim % 2:
            raise LlmlabError(f"head_dim = dim // n_heads = {self.head_dim} must be even: RoPE rotates pairs of values")
        for name in ("layer_ffn_dims", "layer_heads", "layer_kv_heads"):
            widths = getattr(self, name)
            if widths is None:
                continue
            if not isinstance(widths, (list, tuple)):
                raise LlmlabError(f"{name} must be a list of widths, one per layer, got {shown(widths)}")
            widths = tuple(widths)             # a list read from JSON; a tuple keeps the config hashable
            object.__setattr__(self, name, widths)
            if len(widths) != self.n_layers:
                raise LlmlabError(f"{name} has {len(widths)} entries for {self.n_layers} layers: give one "
                                  f"width per layer, or None for the same width in every layer")
            if not all(_is_count(w) for w in widths):
                raise LlmlabError(f"{name} must be positive integers, got {shown(list(widths))}: a layer keeps at "
                                  f"least one channel and one head")
        # one check where every layer is alike: n_layers may come from a file and be absurd
        per_layer = self.layer_heads is not None or self.layer_kv_heads is not None
        for layer in range(self.n_layers) if per_layer else [0]:
            heads, kv_heads = self.heads_of(layer), self.kv_heads_of(layer)
            if heads % kv_heads:
                where = f"layer {layer}" if self.layer_heads or self.layer_kv_heads else "the config"
                raise LlmlabError(f"{where} has {heads} query heads and {kv_heads} key/value heads: grouped-query "
                                  f"attention needs the query heads to be a multiple of the KV heads, each KV "
                                  f"head serving the same number of query heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def ffn_dim_of(self, layer: int) -> int:
        return self.ffn_dim if self.layer_ffn_dims is None else self.layer_ffn_dims[layer]

    def heads_of(self, layer: int) -> int:
        return self.n_heads if self.layer_heads is None else self.layer_heads[layer]

    def kv_heads_of(self, layer: int) -> int:
        return self.n_kv_heads if self.layer_kv_heads is None else self.layer_kv_heads[layer]

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each weight's shape under llmlab's names, as llmlab.model.Transformer holds them; the head
        only where it is not tied to the embedding. Loops over n_layers: bound it first."""
        d, hd = self.dim, self.head_dim
        shapes = {"embed.weight": (self.vocab_size, d), "norm.weight": (d,)}
        if not self.tie_embeddings:
            shapes["head.weight"] = (self.vocab_size, d)
        for i in range(self.n_layers):
            q, kv, ffn = self.heads_of(i) * hd, self.kv_heads_of(i) * hd, self.ffn_dim_of(i)
            shapes.update({f"layers.{i}.{name}": shape for name, shape in [
                ("attn_norm.weight", (d,)), ("attention.wq.weight", (q, d)), ("attention.wk.weight", (kv, d)),
                ("attention.wv.weight", (kv, d)), ("attention.wo.weight", (d, q)), ("mlp_norm.weight", (d,)),
                ("mlp.w_gate.weight", (ffn, d)), ("mlp.w_up.weight", (ffn, d)), ("mlp.w_down.weight", (d, ffn))]})
        return shapes

    def n_params(self) -> int:
        """Parameter count, counting a tied embedding/head once."""
        d, hd = self.dim, self.head_dim
        blocks = 0
        for i in range(self.n_layers):
            q, kv = self.heads_of(i) * hd, self.kv_heads_of(i) * hd
            attention = 2 * d * q + 2 * d * kv               # wq, wo; wk, wv
            mlp = 3 * d * self.ffn_dim_of(i)                 # gate, up, down
            blocks += attention + mlp + 2 * d                # + two RMSNorm weight vectors
        embedding = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embedding + blocks + d + head

    def kv_cache_bytes(self, seq_len: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        # keys and values, for every layer, KV head, position and batch row
        kv_heads = sum(self.kv_heads_of(i) for i in range(self.n_layers))
        return 2 * kv_heads * self.head_dim * seq_len * batch * bytes_per_value


PRESETS = {
    "smollm2-135m": ModelConfig(),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
    ),
    "llama-3-8b": ModelConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise LlmlabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ModelConfig's fields in a GGUF file's metadata, and the defaults llama.cpp takes for the optional ones
GGUF_KEYS = {"vocab_size": "llama.vocab_size", "dim": "llama.embedding_length", "n_layers": "llama.block_count",
             "n_heads": "llama.attention.head_count", "n_kv_heads": "llama.attention.head_count_kv",
             "ffn_dim": "llama.feed_forward_length", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
             "rope_theta": "llama.rope.freq_base", "max_seq_len": "llama.context_length"}
GGUF_DEFAULTS = {"norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 2048}


def config_from_gguf_metadata(meta: dict) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LlmlabError(f"llmlab runs Llama-family models; this GGUF file's architecture is {shown(arch)}")
    per_layer = [key for key in ("llama.attention.head_count", "llama.attention.head_count_kv",
                                 "llama.feed_forward_length") if isinstance(meta.get(key), list)]
    if per_layer:
        raise LlmlabError(f"this GGUF file gives {', '.join(per_layer)} per layer, which llmlab reads only from a "
                          f"model folder: save pruned models with llmlab.hf.save_folder")
    tokens = meta.get("tokenizer.ggml.tokens")
    defaults = {**GGUF_DEFAULTS, "n_kv_heads": meta.get(GGUF_KEYS["n_heads"]),
                "vocab_size": len(tokens) if isinstance(tokens, list) else None}
    fields = {}
    for field, key in GGUF_KEYS.items():
        value = meta.get(key, defaults.get(field))
        if value is None:
            raise LlmlabError(f"the GGUF metadata lacks {key}, so it does not describe a Llama model")
        check_field(field, value, named=f"the GGUF metadata's {key}")
        fields[field] = value
    # tied unless the file has output.weight: decided by the loader, which sees the tensors
    config = _build(fields, "the GGUF metadata", tie_embeddings=True)
    _check_gguf_vocabulary(meta, config.vocab_size)
    return config


def _check_gguf_vocabulary(meta: dict, vocab_size: int) -> None:
    """Token ids index the embedding's vocab_size rows, and each id is a token of the vocabulary: the
    two must be the same size, or some ids have no text or no row. An end-of-text id outside them is
    one the model can never produce: generation would not stop."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return        # no tokenizer; Tokenizer.from_gguf_metadata says so where one is needed
    lists = {"tokens": str, "merges": str, "token_type": int}
    for name, kind in lists.items():
        values = meta.get(f"tokenizer.ggml.{name}", [])
        if not isinstance(values, list) or not all(type(v) is kind for v in values):
            raise LlmlabError(f"the GGUF metadata's tokenizer.ggml.{name} must be a list of {kind.__name__}")
    if len(tokens) != vocab_size:
        raise LlmlabError(f"the GGUF vocabulary (tokenizer.ggml.tokens) has {len(tokens):,} tokens, but "
                          f"llama.vocab_size is {vocab_size:,}: every token id must have both a token and an "
                          f"embedding row")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise LlmlabError(f"the GGUF metadata's tokenizer.ggml.token_type has {len(types):,} entries for "
                          f"{len(tokens):,} tokens: one type per token")
    for name in ("bos", "eos"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and not (type(token_id) is int and 0 <= token_id < vocab_size):
            raise LlmlabError(f"the GGUF metadata's tokenizer.ggml.{name}_token_id is {shown(token_id)}, outside the "
                              f"vocabulary of {vocab_size:,} tokens (ids 0..{vocab_size - 1})")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise LlmlabError(f"the GGUF metadata's tokenizer.chat_template must be a string, "
                          f"got {type(template).__name__}")


# config.json keys that only llmlab reads: per-layer widths (see ModelConfig), written by
# llmlab.hf.save_folder where the layers of a pruned model differ
LAYER_WIDTH_KEYS = {"layer_ffn_dims": "llmlab_layer_ffn_dims", "layer_heads": "llmlab_layer_heads",
                    "layer_kv_heads": "llmlab_layer_kv_heads"}


def config_from_hf(cfg: dict) -> ModelConfig:
    """Read a Hugging Face config.json (transformers 4.x writes rope_theta / rope_scaling at the top
    level, 5.x a rope_parameters dict); refuse what this engine would run wrongly.

    A head_dim key other than hidden_size / num_attention_heads (a model with heads pruned in every
    layer alike, which transformers loads too) is kept as the head size: n_heads becomes
    hidden_size / head_dim and every layer has num_attention_heads of them. The llmlab_layer_* keys
    give widths that differ by layer (a folder only llmlab can load)."""
    if not isinstance(cfg, dict):
        raise LlmlabError(f"config.json must hold a JSON object of settings, not a {type(cfg).__name__}")
    rope, scaling = _hf_dict(cfg, "rope_parameters"), _hf_dict(cfg, "rope_scaling")
    rope_type = rope.get("rope_type", scaling.get("rope_type", "default"))
    dim = _hf_value(cfg, "hidden_size", "dim")
    heads = _hf_value(cfg, "num_attention_heads", "n_heads")
    n_layers = _hf_value(cfg, "num_hidden_layers", "n_layers")
    head_dim = cfg.get("head_dim") or dim // heads       # null in some exports
    if not _is_count(head_dim):
        raise LlmlabError(f"config.json's head_dim is {shown(head_dim)}: it must be a positive integer")
    unsupported = {
        "model_type": cfg.get("model_type") not in ("llama", None),
        "rope_type": rope_type != "default",           # Llama 3.1+ scaling changes RoPE frequencies
        "attention_bias": bool(cfg.get("attention_bias")),
        "mlp_bias": bool(cfg.get("mlp_bias")),
        "head_dim": dim % head_dim != 0,               # llmlab's head_dim is dim // n_heads
    }
    wrong = [f"{key}={shown(cfg.get(key, rope_type))}" for key, bad in unsupported.items() if bad]
    if wrong:
        raise LlmlabError(f"config.json has {', '.join(wrong)}: llmlab runs plain Llama-architecture models "
                          f"(no biases, no RoPE scaling, a head_dim that divides hidden_size)")
    n_heads = dim // head_dim
    rope_theta = _hf_value(cfg, "rope_theta", "rope_theta", 10000.0)
    if "rope_theta" in rope:                           # 5.x's place; 4.x reads the top-level key
        check_field("rope_theta", rope["rope_theta"], named="config.json's rope_parameters.rope_theta")
        if "rope_theta" in cfg and cfg["rope_theta"] != rope["rope_theta"]:
            raise LlmlabError(f"config.json gives rope_theta {shown(cfg['rope_theta'])} and rope_parameters.rope_theta "
                              f"{shown(rope['rope_theta'])}: transformers 4.x and 5.x would run different models")
        rope_theta = rope["rope_theta"]
    per_layer = {field: cfg.get(key) for field, key in LAYER_WIDTH_KEYS.items()}
    if per_layer["layer_heads"] is None and heads != n_heads:
        per_layer["layer_heads"] = (heads,) * n_layers
    return _build(dict(
        vocab_size=_hf_value(cfg, "vocab_size", "vocab_size"),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_hf_value(cfg, "num_key_value_heads", "n_kv_heads", heads, null_is_default=True),
        ffn_dim=_hf_value(cfg, "intermediate_size", "ffn_dim"),
        norm_eps=_hf_value(cfg, "rms_norm_eps", "norm_eps", 1e-5),
        rope_theta=rope_theta,
        max_seq_len=_hf_value(cfg, "max_position_embeddings", "max_seq_len", 2048),
        tie_embeddings=_hf_value(cfg, "tie_word_embeddings", "tie_embeddings", False),
        **per_layer,
    ), "config.json")


def _build(fields: dict, source: str, **more) -> ModelConfig:
    try:
        return ModelConfig(**fields, **more)
    except LlmlabError as e:        # a rule between fields: say where they were read
        raise LlmlabError(f"{source} gives a model llmlab cannot build: {e}") from None


_REQUIRED = object()


def _hf_value(cfg: dict, key: str, field: str, default=_REQUIRED, null_is_default: bool = False):
    """config.json's `key`, checked against the rule for ModelConfig.`field`."""
    value = cfg.get(key, default)
    if value is None and null_is_default:
        value = default
    if value is _REQUIRED:
        raise LlmlabError(f"config.json lacks {key}, which a Llama model's config gives")
    check_field(field, value, named=f"config.json's {key}")
    return value


def _hf_dict(cfg: dict, key: str) -> dict:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise LlmlabError(f"config.json's {key} must be an object, got {shown(value)}")
    return value
