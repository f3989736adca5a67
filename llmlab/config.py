"""The shape of a Llama-family model, and named presets of real shapes for speed work."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import LlmlabError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 49152
    dim: int = 576                 # width of the residual stream, d_model
    n_layers: int = 30
    n_heads: int = 9               # query heads
    n_kv_heads: int = 3            # key/value heads; n_heads // n_kv_heads query heads share each (GQA)
    ffn_dim: int = 1536            # hidden width of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = True    # the LM head reuses the token embedding matrix

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise LlmlabError(
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), and n_heads by "
                f"n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def n_params(self) -> int:
        """Parameter count, counting a tied embedding/head once."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2            # wq, wo; wk, wv
        mlp = 3 * d * self.ffn_dim                    # gate, up, down
        per_layer = attention + mlp + 2 * d           # + two RMSNorm weight vectors
        embedding = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embedding + self.n_layers * per_layer + d + head

    def kv_cache_bytes(self, seq_len: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        # keys and values, for every layer, KV head, position and batch row
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * seq_len * batch * bytes_per_value


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


def config_from_hf(cfg: dict) -> ModelConfig:
    """Read a Hugging Face config.json (transformers 4.x writes rope_theta / rope_scaling at the top
    level, 5.x a rope_parameters dict); refuse what this engine would run wrongly."""
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
    n_heads = cfg["num_attention_heads"]
    unsupported = {
        "model_type": cfg.get("model_type") not in ("llama", None),
        "rope_type": rope_type != "default",           # Llama 3.1+ scaling changes RoPE frequencies
        "attention_bias": bool(cfg.get("attention_bias")),
        "mlp_bias": bool(cfg.get("mlp_bias")),
        "head_dim": cfg.get("head_dim", cfg["hidden_size"] // n_heads) != cfg["hidden_size"] // n_heads,
    }
    wrong = [f"{key}={cfg.get(key, rope_type)!r}" for key, bad in unsupported.items() if bad]
    if wrong:
        raise LlmlabError(f"config.json has {', '.join(wrong)}: llmlab runs plain Llama-architecture models "
                          f"(no biases, no RoPE scaling, head_dim = hidden_size / num_attention_heads)")
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    )
