"""Load a Hugging Face model folder: config.json, *.safetensors weights and tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from .config import ModelConfig, config_from_hf
from .errors import LlmlabError
from .tokenizer import Tokenizer

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.w_gate.weight",
    "mlp.up_proj.weight": "mlp.w_up.weight",
    "mlp.down_proj.weight": "mlp.w_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "head.weight"}


def hf_name_to_llmlab(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, _, rest = name.partition(".layers.")
    layer, _, kind = rest.partition(".")
    if prefix != "model" or kind not in _LAYER_NAMES:
        raise LlmlabError(f"unexpected weight {name!r}: not part of a plain Llama model")
    return f"layers.{layer}.{_LAYER_NAMES[kind]}"


def load_folder(folder: str | Path) -> tuple[ModelConfig, dict, Tokenizer]:
    folder = Path(folder)
    needed = ["config.json", "tokenizer.json"]
    missing = [n for n in needed if not (folder / n).is_file()]
    weight_files = sorted(folder.glob("*.safetensors"))
    if missing or not weight_files:
        raise LlmlabError(
            f"{folder}: a Hugging Face model folder needs config.json, tokenizer.json and *.safetensors; "
            f"missing: {', '.join(missing + ([] if weight_files else ['*.safetensors']))}"
        )
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    state = {}
    for file in weight_files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer some older exports save; recomputed from rope_theta
                state[hf_name_to_llmlab(name)] = f.get_tensor(name)
    if config.tie_embeddings:
        state.pop("head.weight", None)
    return config, state, tokenizer_from_hf(folder)


def tokenizer_from_hf(folder: Path) -> Tokenizer:
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise LlmlabError(f"{folder}/tokenizer.json: llmlab reads byte-level BPE tokenizers only")
    if not _is_smollm_pre_tokenizer(spec.get("pre_tokenizer")):
        raise LlmlabError(
            f"{folder}/tokenizer.json: its pre-tokenizer is not SmolLM's (digits split, then GPT-2's byte-level "
            f"regex); llmlab implements that one only, and another would give different token ids"
        )
    vocab = model["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max(list(vocab.values()) + list(added)) + 1
    tokens = [""] * size
    for token, i in vocab.items():
        tokens[i] = token
    types = [1] * size                                   # 1: normal, 3: control (llama.cpp's codes)
    for i, t in added.items():
        tokens[i], types[i] = t["content"], 3 if t.get("special") else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    extra = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    by_text = {t: i for i, t in enumerate(tokens)}
    bos, eos = by_text.get(extra.get("bos_token")), by_text.get(extra.get("eos_token"))
    if bos is None or eos is None:
        raise LlmlabError(f"{folder}: tokenizer_config.json must name bos_token and eos_token")
    template = extra.get("chat_template")
    if (folder / "chat_template.jinja").is_file():   # where newer transformers versions save it
        template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(tokens, merges, types, bos_id=bos, eos_id=eos, chat_template=template)


def _is_smollm_pre_tokenizer(pre: dict | None) -> bool:
    if not pre or pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers", [])
    return (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space", False))
