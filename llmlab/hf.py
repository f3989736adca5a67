"""Hugging Face model folders: config.json, *.safetensors weights and tokenizer.json. `load_folder`
reads one; `save_folder` writes an LLM as one (a pruned or distilled model, to load again later)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LAYER_WIDTH_KEYS, ModelConfig, config_from_hf, shown
from .errors import LlmlabError
from .tokenizer import Tokenizer
from .weight_checks import check_finite, check_shapes

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


_HF_LAYER_NAMES = {llmlab: hf for hf, llmlab in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {llmlab: hf for hf, llmlab in _TOP_NAMES.items()}


def _renamed(name: str, top: dict, per_layer: dict, layers_from: str, layers_to: str) -> str | None:
    """A weight's name in the other naming (top-level names and per-layer names each from their table,
    the layer prefix swapped), or None where the name is not a plain Llama weight."""
    if name in top:
        return top[name]
    if not name.startswith(layers_from):
        return None
    layer, _, kind = name.removeprefix(layers_from).partition(".")
    return f"{layers_to}{layer}.{per_layer[kind]}" if kind in per_layer else None


def hf_name_to_llmlab(name: str) -> str:
    renamed = _renamed(name, _TOP_NAMES, _LAYER_NAMES, "model.layers.", "layers.")
    if renamed is None:
        raise LlmlabError(f"unexpected weight {shown(name)}: not part of a plain Llama model")
    return renamed


# dtypes a weight may have: an integer or boolean tensor cast to float would load and compute nonsense
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def load_folder(folder: str | Path) -> tuple[ModelConfig, dict, Tokenizer]:
    """config.json, the weights of every *.safetensors file and tokenizer.json, checked against each
    other: each weight's name, dtype and shape before any is read, its values (no NaN or inf) after.
    Only safetensors are read: pytorch_model.bin is a pickle, and unpickling runs code from the file."""
    folder = Path(folder)
    needed = ["config.json", "tokenizer.json"]
    missing = [n for n in needed if not (folder / n).is_file()]
    weight_files = sorted(folder.glob("*.safetensors"))
    if missing or not weight_files:
        raise LlmlabError(
            f"{folder}: a Hugging Face model folder needs config.json, tokenizer.json and *.safetensors; "
            f"missing: {', '.join(missing + ([] if weight_files else ['*.safetensors']))}"
        )
    config = read_config(folder)
    where = {}                                     # llmlab name -> (file, name there, shape)
    for file in weight_files:
        for name, (dtype, shape) in tensor_headers(file).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some older exports save; recomputed from rope_theta
            ours = _llmlab_name_in(file, name)
            if ours in where:
                raise LlmlabError(f"{folder}: weight {shown(name)} is in both {where[ours][0].name} and {file.name}")
            if dtype not in FLOAT_DTYPES:
                raise LlmlabError(f"{file}: weight {shown(name)} is stored as {dtype}; llmlab reads float weights "
                                  f"({', '.join(FLOAT_DTYPES)}) and will not cast integers or booleans to floats")
            where[ours] = (file, name, shape)
    if config.tie_embeddings:
        where.pop("head.weight", None)             # transformers ignores a saved head when it is tied
    check_shapes({ours: shape for ours, (_, _, shape) in where.items()}, config, folder,
                 {ours: name for ours, (_, name, _) in where.items()})
    state = {}
    for file in weight_files:
        with _safetensors(file) as f:
            for ours, (in_file, name, _) in where.items():
                if in_file == file:
                    state[ours] = f.get_tensor(name)
                    check_finite(name, state[ours], file)
    tokenizer = tokenizer_from_hf(folder)
    if tokenizer.vocab_size != config.vocab_size:
        raise LlmlabError(f"{folder}: tokenizer.json has {tokenizer.vocab_size:,} tokens, but config.json's "
                          f"vocab_size is {config.vocab_size:,}: every token id must have both a token and an "
                          f"embedding row")
    return config, state, tokenizer


def read_config(folder: Path) -> ModelConfig:
    """The folder's config.json as a ModelConfig; any problem an LlmlabError naming the file."""
    path = Path(folder) / "config.json"
    try:
        return config_from_hf(_read_json(path))
    except LlmlabError as e:
        raise LlmlabError(f"{path}: {e}") from None


def tensor_headers(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's dtype ("F32", "BF16", "I64", ...) and shape, from the safetensors header alone."""
    with _safetensors(file) as f:
        return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}


@contextmanager
def _safetensors(file: Path):
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except (OSError, SafetensorError) as e:       # the library checks the header and the data's extent
        raise LlmlabError(f"{file}: not a readable safetensors file ({e}). Download it again.") from None


def _llmlab_name_in(file: Path, name: str) -> str:
    try:
        return hf_name_to_llmlab(name)
    except LlmlabError as e:
        raise LlmlabError(f"{file}: {e}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except OSError as e:
        raise LlmlabError(f"{path}: cannot read the file ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:     # bad JSON or UTF-8, or nesting deeper than Python's stack
        raise LlmlabError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise LlmlabError(f"{path}: cannot read it as UTF-8 text ({e})") from None


def tokenizer_from_hf(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    spec = _read_json(path)
    model = spec.get("model") if isinstance(spec, dict) else None
    decoder = spec.get("decoder") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(decoder, dict) \
            or decoder.get("type") != "ByteLevel":
        raise LlmlabError(f"{path}: llmlab reads byte-level BPE tokenizers only")
    if not _is_smollm_pre_tokenizer(spec.get("pre_tokenizer")):
        raise LlmlabError(
            f"{path}: its pre-tokenizer is not SmolLM's (digits split, then GPT-2's byte-level "
            f"regex); llmlab implements that one only, and another would give different token ids"
        )
    vocab, added, merges = _vocabulary(path, model, spec.get("added_tokens", []))
    # ids are list indices: bounded by the entries the file holds, so a huge id cannot ask for memory
    size = max([*vocab.values(), *added], default=-1) + 1
    if min([*vocab.values(), *added], default=0) < 0 or size > len(vocab) + len(added):
        raise LlmlabError(f"{path}: token ids must run from 0 up, one per token; "
                          f"{len(vocab) + len(added):,} tokens reach id {size - 1:,}")
    tokens = [""] * size
    for token, i in vocab.items():
        tokens[i] = token
    types = [1] * size                                   # 1: normal, 3: control (llama.cpp's codes)
    for i, t in added.items():
        tokens[i], types[i] = t["content"], 3 if t.get("special") else 1
    config_path = folder / "tokenizer_config.json"
    extra = _read_json(config_path) if config_path.is_file() else {}
    extra = extra if isinstance(extra, dict) else {}
    by_text = {t: i for i, t in enumerate(tokens)}
    bos, eos = (by_text.get(_token_text(extra.get(key))) for key in ("bos_token", "eos_token"))
    if bos is None or eos is None:
        raise LlmlabError(f"{folder}: tokenizer_config.json must name bos_token and eos_token, tokens of the "
                          f"vocabulary")
    template = extra.get("chat_template")
    if (folder / "chat_template.jinja").is_file():   # where newer transformers versions save it
        template = _read_text(folder / "chat_template.jinja")
    if template is not None and not isinstance(template, str):
        raise LlmlabError(f"{config_path}: chat_template must be one template string, not {type(template).__name__}")
    return Tokenizer(tokens, merges, types, bos_id=bos, eos_id=eos, chat_template=template)


def _vocabulary(path: Path, model: dict, added_tokens) -> tuple[dict[str, int], dict[int, dict], list[str]]:
    """vocab (token -> id), added tokens by id, merges as "a b" strings; refused unless well-typed."""
    vocab, merges = model.get("vocab"), model.get("merges", [])
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
        raise LlmlabError(f"{path}: model.vocab must map each token to an integer id")
    if not isinstance(added_tokens, list) or not all(isinstance(t, dict) and type(t.get("id")) is int
                                                     and isinstance(t.get("content"), str) for t in added_tokens):
        raise LlmlabError(f"{path}: added_tokens must be a list of {{\"id\": int, \"content\": str, ...}}")
    if not isinstance(merges, list) or not all(
            isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m))
            for m in merges):
        raise LlmlabError(f"{path}: model.merges must be a list of \"a b\" strings or [a, b] pairs")
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return vocab, {t["id"]: t for t in added_tokens}, merges


def _token_text(token) -> str | None:
    # tokenizer_config.json names a token by its text, or by an AddedToken object holding it
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def _is_smollm_pre_tokenizer(pre) -> bool:
    if not isinstance(pre, dict) or pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers", [])
    return (isinstance(steps, list) and len(steps) == 2 and all(isinstance(s, dict) for s in steps)
            and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space", False))


# --- saving ------------------------------------------------------------------------------------

def llmlab_name_to_hf(name: str) -> str:
    renamed = _renamed(name, _HF_TOP_NAMES, _HF_LAYER_NAMES, "layers.", "model.layers.")
    if renamed is None:
        raise LlmlabError(f"cannot save weight {name!r} under a Hugging Face name: save_folder writes plain "
                          f"float weights, so save a model before quantizing it")
    return renamed


def config_to_hf(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    """Hugging Face's Llama config.json keys for `config` (config_from_hf reads them back)."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
          "hidden_size": config.dim, "num_hidden_layers": config.n_layers, "head_dim": config.head_dim,
          "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rms_norm_eps": config.norm_eps,
          # rope_theta for transformers 4.x, rope_parameters for 5.x
          "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
          "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
          "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    widths = {"intermediate_size": ("layer_ffn_dims", config.ffn_dim, config.ffn_dim_of),
              "num_attention_heads": ("layer_heads", config.n_heads, config.heads_of),
              "num_key_value_heads": ("layer_kv_heads", config.n_kv_heads, config.kv_heads_of)}
    for key, (field, uniform, width_of) in widths.items():
        per_layer = [width_of(i) for i in range(config.n_layers)]
        if len(set(per_layer)) == 1:       # the same in every layer: Hugging Face's key says it all
            hf[key] = per_layer[0]
        else:
            hf[key], hf[LAYER_WIDTH_KEYS[field]] = uniform, per_layer
    return hf


def tokenizer_to_hf(tokenizer: Tokenizer) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json for llmlab's byte-level BPE tokenizer, in the form
    SmolLM2's own folder has them: the vocabulary, the merges in rank order, the control tokens as
    added tokens, and SmolLM2's pre-tokenizer (each digit alone, then GPT-2's byte-level split).
    Added tokens that are not control tokens (SmolLM2 has none) are not written."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise LlmlabError("save_folder needs a tokenizer with bos and eos tokens: tokenizer_config.json names them")
    merges = sorted(tokenizer.merge_ranks, key=tokenizer.merge_ranks.get)
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokenizer.tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in sorted(tokenizer.special_ids)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": tokenizer.token_to_id, "merges": [list(pair) for pair in merges]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.tokens[tokenizer.bos_id],
              "eos_token": tokenizer.tokens[tokenizer.eos_id], "chat_template": tokenizer.chat_template}
    return spec, config


def save_folder(llm, folder: str | Path) -> Path:
    """Save an LLM as a model folder that `llmlab.load(folder)` reads back: config.json,
    model.safetensors (the model's weights in its dtype, under Hugging Face's names; a tied head is
    stored once, as transformers does), tokenizer.json and tokenizer_config.json.

    A model whose layers all have the same widths, unpruned or pruned alike in every layer, is a
    plain Llama folder that transformers loads too. Widths that differ from layer to layer are
    written as llmlab_layer_* keys (config.LAYER_WIDTH_KEYS) beside Hugging Face's: such a folder is
    llmlab's only, since transformers builds every layer alike and would refuse its weights."""
    if llm.tokenizer is None:
        raise LlmlabError(f"{llm.source} has no tokenizer, and a model folder needs tokenizer.json")
    folder = Path(folder)
    others = [f.name for f in folder.glob("*.safetensors") if f.name != "model.safetensors"]
    if others:       # load_folder reads every *.safetensors file: old shards would mix into this model
        raise LlmlabError(f"{folder} already holds {', '.join(others)}: save into an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    state = llm.model.state_dict()
    if llm.config.tie_embeddings:
        state.pop("head.weight")
    # clones: fused projections are row slices of one stacked matrix, and safetensors refuses
    # tensors that share memory
    tensors = {llmlab_name_to_hf(name): w.detach().to("cpu", copy=True).contiguous() for name, w in state.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(llm.config, llm.tokenizer), indent=2))
    spec, tokenizer_config = tokenizer_to_hf(llm.tokenizer)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    return folder
