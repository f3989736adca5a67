"""The shape of a Llama-family model, and named presets of real shapes for speed work."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import LlmlabError


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
        if self.dim % self.n_heads:
            raise LlmlabError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}): "
                              f"head_dim = dim // n_heads")
        for name in ("layer_ffn_dims", "layer_heads", "layer_kv_heads"):
            widths = getattr(self, name)
            if widths is None:
                continue
            widths = tuple(widths)             # a list read from JSON; a tuple keeps the config hashable
            object.__setattr__(self, name, widths)
            if len(widths) != self.n_layers:
                raise LlmlabError(f"{name} has {len(widths)} entries for {self.n_layers} layers: give one "
                                  f"width per layer, or None for the same width in every layer")
            if not all(isinstance(w, int) and w > 0 for w in widths):
                raise LlmlabError(f"{name} must be positive integers, got {list(widths)}: a layer keeps at "
                                  f"least one channel and one head")
        for layer in range(self.n_layers):
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


def config_from_gguf_metadata(meta: dict) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LlmlabError(f"llmlab runs Llama-family models; this GGUF file's architecture is {arch!r}")
    per_layer = [key for key in ("llama.attention.head_count", "llama.attention.head_count_kv",
                                 "llama.feed_forward_length") if isinstance(meta.get(key), list)]
    if per_layer:
        raise LlmlabError(f"this GGUF file gives {', '.join(per_layer)} per layer, which llmlab reads only from a "
                          f"model folder: save pruned models with llmlab.hf.save_folder")
    n_heads = meta["llama.attention.head_count"]
    return ModelConfig(
        vocab_size=meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        dim=meta["llama.embedding_length"],
        n_layers=meta["llama.block_count"],
        n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        ffn_dim=meta["llama.feed_forward_length"],
        norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        max_seq_len=meta.get("llama.context_length", 2048),
        tie_embeddings=True,  # decided by the loader: tied when the file has no output.weight
    )


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
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
    dim, heads, n_layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or dim // heads
    unsupported = {
        "model_type": cfg.get("model_type") not in ("llama", None),
        "rope_type": rope_type != "default",           # Llama 3.1+ scaling changes RoPE frequencies
        "attention_bias": bool(cfg.get("attention_bias")),
        "mlp_bias": bool(cfg.get("mlp_bias")),
        "head_dim": dim % head_dim != 0,               # llmlab's head_dim is dim // n_heads
    }
    wrong = [f"{key}={cfg.get(key, rope_type)!r}" for key, bad in unsupported.items() if bad]
    if wrong:
        raise LlmlabError(f"config.json has {', '.join(wrong)}: llmlab runs plain Llama-architecture models "
                          f"(no biases, no RoPE scaling, a head_dim that divides hidden_size)")
    n_heads = dim // head_dim
    per_layer = {field: cfg.get(key) for field, key in LAYER_WIDTH_KEYS.items()}
    if per_layer["layer_heads"] is None and heads != n_heads:
        per_layer["layer_heads"] = (heads,) * n_layers
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        **per_layer,
    )
