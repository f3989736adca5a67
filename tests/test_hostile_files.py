"""Malformed and hostile model files: each refused at load with an LlmlabError that says what is wrong,
fast, never a stray KeyError or NumPy error, never a model that loads and answers wrongly.

The files are real: a tiny random-weight Llama (2 layers, 262 tokens) written with the `gguf`
package's GGUFWriter, then damaged byte by byte where the `gguf` package's own reader says each field
lies; and that model saved as a Hugging Face folder, then damaged.
"""

import json
import math
import os
import pickle
import struct
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType as V
from test_gguf import write_gguf
from safetensors.torch import load_file, save_file

import llmlab
from llmlab import cli, hf
from llmlab.errors import LlmlabError
from llmlab.gguf import GGUFFile
from llmlab.tokenizer import bytes_to_unicode

# --- the tiny model ------------------------------------------------------------------------------

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, FFN = 64, 2, 4, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
VOCAB = len(TOKENS)                                          # 262
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def tiny_metadata() -> dict:
    """key -> (value, type[, element type]) of a small but complete Llama GGUF."""
    return {
        "llama.block_count": (N_LAYERS, V.UINT32), "llama.context_length": (256, V.UINT32),
        "llama.embedding_length": (DIM, V.UINT32), "llama.feed_forward_length": (FFN, V.UINT32),
        "llama.attention.head_count": (N_HEADS, V.UINT32), "llama.attention.head_count_kv": (N_KV_HEADS, V.UINT32),
        "llama.rope.freq_base": (10000.0, V.FLOAT32), "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        "llama.vocab_size": (VOCAB, V.UINT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("smollm", V.STRING),
        "tokenizer.ggml.tokens": (TOKENS, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": ([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)), V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (MERGES, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32),
        "tokenizer.chat_template": (TEMPLATE, V.STRING),
    }


def tiny_tensors(seed: int = 0) -> dict:
    """name -> (float32 values in PyTorch order, how the file stores them), llama.cpp's names and order."""
    rng = np.random.default_rng(seed)
    q, kv = DIM, DIM // N_HEADS * N_KV_HEADS

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)

    tensors = {"token_embd.weight": (matrix(VOCAB, DIM), Q.Q8_0)}
    for i in range(N_LAYERS):
        tensors.update({
            f"blk.{i}.attn_norm.weight": (norm(), Q.F32),
            f"blk.{i}.attn_q.weight": (matrix(q, DIM), Q.Q4_1), f"blk.{i}.attn_k.weight": (matrix(kv, DIM), Q.Q4_1),
            f"blk.{i}.attn_v.weight": (matrix(kv, DIM), Q.Q8_0), f"blk.{i}.attn_output.weight": (matrix(DIM, q), Q.Q4_1),
            f"blk.{i}.ffn_norm.weight": (norm(), Q.F32),
            f"blk.{i}.ffn_gate.weight": (matrix(FFN, DIM), Q.Q4_1), f"blk.{i}.ffn_up.weight": (matrix(FFN, DIM), Q.Q4_1),
            f"blk.{i}.ffn_down.weight": (matrix(DIM, FFN), Q.Q8_0),
        })
    tensors["output_norm.weight"] = (norm(), Q.F32)
    return tensors


def write_tiny_gguf(path, metadata: dict | None = None, tensors: dict | None = None):
    """The tiny model, with metadata entries replaced (a value, or (value, type[, element type]), or None
    to leave the key out) and tensors replaced ((values, type), or None to leave it out)."""
    meta = tiny_metadata()
    for key, value in (metadata or {}).items():
        meta[key] = value if value is None or isinstance(value, tuple) else (value, *meta[key][1:])
    write_gguf(path, {name: spec for name, spec in {**tiny_tensors(), **(tensors or {})}.items() if spec is not None},
               {key: spec for key, spec in meta.items() if spec is not None})
    return path


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf").read_bytes()


@pytest.fixture
def tiny_gguf(tmp_path, tiny_gguf_bytes):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf_bytes)
    return path


def tiny_folder(folder, gguf_path):
    """The tiny model saved as a Hugging Face folder by llmlab itself."""
    hf.save_folder(llmlab.load(gguf_path), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder_files(tmp_path_factory) -> dict:
    where = tmp_path_factory.mktemp("tiny_hf")
    folder = tiny_folder(where / "model", write_tiny_gguf(where / "tiny.gguf"))
    return {f.name: f.read_bytes() for f in folder.iterdir()}


@pytest.fixture
def folder(tmp_path, tiny_folder_files):
    path = tmp_path / "model"
    path.mkdir()
    for name, data in tiny_folder_files.items():
        (path / name).write_bytes(data)
    return path


# --- where each field lies, by the `gguf` package's reader --------------------------------------

def value_at(path, key: str) -> int:
    """File offset of the value of metadata `key` (for an array: of its element type, then length)."""
    return GGUFReader(path).fields[key].offset + 8 + len(key.encode()) + 4


def tensor_field_at(path, name: str, which: str) -> int:
    """File offset of tensor `name`'s "name" (its length), "n_dims", "dims", "type" or "offset" field."""
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    if which == "name":
        return t.field.offset
    n_dims = len(t.shape)
    at = t.field.offset + 8 + len(name.encode())
    return at + {"n_dims": 0, "dims": 4, "type": 4 + 8 * n_dims, "offset": 8 + 8 * n_dims}[which]


def tensor_data_at(path, name: str) -> int:
    return next(int(t.data_offset) for t in GGUFReader(path).tensors if t.name == name)


def patch(path, at: int, fmt: str, value):
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


def refused(action, *fragments, within: float = 2.0) -> str:
    """action() raises an LlmlabError holding every fragment, within `within` seconds."""
    start = time.perf_counter()
    with pytest.raises(LlmlabError) as info:
        action()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert elapsed < within, f"took {elapsed:.2f} s: {message}"
    return message


def load(path):
    return lambda: llmlab.load(path)


# --- the good files load ------------------------------------------------------------------------

def test_the_tiny_model_loads_and_runs(tiny_gguf, folder):
    for source in (tiny_gguf, folder):
        llm = llmlab.load(source)
        assert llm.config.vocab_size == VOCAB and llm.tokenizer.eos_id == 2
        assert llm.logits(llm.tokenizer.encode("the the")).isfinite().all()


# --- unbounded work from a file: every count checked against the bytes left ------------------------

@pytest.mark.bad_input(kind="GGUF metadata array length 2^40 (strings or numbers)",
                       gets="LlmlabError naming the key and the bytes left, from load() and `llmlab info`, in < 1 s")
@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"])
def test_array_length_of_2_to_the_40(tiny_gguf, key, capsys):
    patch(tiny_gguf, value_at(tiny_gguf, key) + 4, "<Q", 2**40)
    message = refused(load(tiny_gguf), str(tiny_gguf), repr(key), "1,099,511,627,776", "bytes are left", within=1)
    assert "corrupt or truncated" in message
    assert cli.main(["info", "--model", str(tiny_gguf)]) == 2
    assert f"{key!r}" in capsys.readouterr().err


@pytest.mark.bad_input(kind="GGUF string length 2^62 (a metadata value, a key, a tensor name)",
                       gets="LlmlabError naming what the string is and the bytes left, in < 1 s")
@pytest.mark.parametrize("where", ["value", "key", "tensor name"])
def test_string_length_of_2_to_the_62(tiny_gguf, where):
    at = {"value": value_at(tiny_gguf, "tokenizer.ggml.model"),
          "key": GGUFReader(tiny_gguf).fields["tokenizer.ggml.model"].offset,
          "tensor name": tensor_field_at(tiny_gguf, "blk.0.attn_q.weight", "name")}
    patch(tiny_gguf, at[where], "<Q", 2**62)
    what = {"value": "'tokenizer.ggml.model'", "key": "a metadata key", "tensor name": "a tensor name"}[where]
    refused(load(tiny_gguf), what, "4,611,686,018,427,387,904 bytes", within=1)


@pytest.mark.bad_input(kind="GGUF tensor count or metadata count 2^60",
                       gets="LlmlabError: the counts need more bytes than the file has, in < 1 s")
@pytest.mark.parametrize("field_at", [8, 16], ids=["tensor count", "metadata count"])
def test_huge_counts_in_the_header(tiny_gguf, field_at):
    patch(tiny_gguf, field_at, "<Q", 2**60)
    refused(load(tiny_gguf), "1,152,921,504,606,846,976", "bytes are left", within=1)


@pytest.mark.bad_input(kind="GGUF tensor with 2^31 dimensions, or a dimension of 2^40",
                       gets="LlmlabError naming the tensor (1 to 4 dimensions; runs past the end of the file)")
def test_absurd_tensor_dimensions(tiny_gguf, tiny_gguf_bytes):
    patch(tiny_gguf, tensor_field_at(tiny_gguf, "blk.1.attn_q.weight", "n_dims"), "<I", 2**31)
    refused(load(tiny_gguf), "'blk.1.attn_q.weight'", "2,147,483,648 dimensions", within=1)
    tiny_gguf.write_bytes(tiny_gguf_bytes)
    patch(tiny_gguf, tensor_field_at(tiny_gguf, "blk.1.attn_q.weight", "dims") + 8, "<Q", 2**40)
    refused(load(tiny_gguf), "'blk.1.attn_q.weight'", "runs past the end of the file", within=1)


@pytest.mark.bad_input(kind="GGUF metadata of an unknown value type, or an array of arrays",
                       gets="LlmlabError naming the key and the type")
@pytest.mark.parametrize("element", [False, True], ids=["value type 99", "array of arrays"])
def test_unknown_value_types(tiny_gguf, element):
    at = value_at(tiny_gguf, "tokenizer.ggml.merges")
    patch(tiny_gguf, at if element else at - 4, "<I", V.ARRAY if element else 99)
    refused(load(tiny_gguf), "'tokenizer.ggml.merges'", "value type", within=1)


@pytest.mark.bad_input(kind="GGUF with a metadata key or a tensor name given twice",
                       gets="LlmlabError naming the duplicate")
def test_duplicate_keys_and_tensor_names(tiny_gguf, tiny_gguf_bytes):
    assert len(b"llama.context_length") == len(b"tokenizer.ggml.model")
    tiny_gguf.write_bytes(tiny_gguf_bytes.replace(b"llama.context_length", b"tokenizer.ggml.model"))
    refused(load(tiny_gguf), "metadata key 'tokenizer.ggml.model' appears twice")
    tiny_gguf.write_bytes(tiny_gguf_bytes.replace(b"blk.1.attn_q.weight", b"blk.1.attn_k.weight"))
    refused(load(tiny_gguf), "two tensors are named 'blk.1.attn_k.weight'")


# --- corrupt layouts that would load and answer wrongly -------------------------------------------

@pytest.mark.bad_input(kind="GGUF tensor offset moved by one byte",
                       gets="LlmlabError: the offset is not a multiple of the alignment, naming the tensor")
def test_offset_moved_by_one_byte(tiny_gguf):
    at = tensor_field_at(tiny_gguf, "blk.1.ffn_up.weight", "offset")
    patch(tiny_gguf, at, "<Q", struct.unpack_from("<Q", tiny_gguf.read_bytes(), at)[0] + 1)
    refused(load(tiny_gguf), "'blk.1.ffn_up.weight'", "not a multiple of the alignment")


@pytest.mark.bad_input(kind="GGUF with two tensors overlapping (or a gap between them)",
                       gets="LlmlabError naming both tensors and where the next one must start")
@pytest.mark.parametrize("shift", [-32, 32], ids=["overlap", "gap"])
def test_overlapping_tensors(tiny_gguf, shift):
    at = tensor_field_at(tiny_gguf, "blk.0.ffn_down.weight", "offset")
    patch(tiny_gguf, at, "<Q", struct.unpack_from("<Q", tiny_gguf.read_bytes(), at)[0] + shift)
    refused(load(tiny_gguf), "'blk.0.ffn_down.weight'", "'blk.0.ffn_up.weight' before it",
            "overlaps" if shift < 0 else "gap of 32 bytes")


@pytest.mark.bad_input(kind="GGUF tensor extending past the end of the file",
                       gets="LlmlabError naming the tensor, the bytes it needs and the file size")
def test_tensor_past_the_end(tiny_gguf):
    size = tiny_gguf.stat().st_size
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[:-64])
    refused(load(tiny_gguf), "'output_norm.weight'", "runs past the end of the file", f"{size - 64:,}")


@pytest.mark.bad_input(kind="GGUF tensor type relabelled (Q4_1 read as Q8_0, Q8_0 as Q4_1)",
                       gets="LlmlabError: the relabelled tensor's size no longer fits the next offset or the file end")
def test_relabelled_tensor_type(tiny_gguf, tiny_gguf_bytes):
    patch(tiny_gguf, tensor_field_at(tiny_gguf, "blk.0.attn_q.weight", "type"), "<I", Q.Q8_0)
    refused(load(tiny_gguf), "'blk.0.attn_q.weight' before it (Q8_0", "overlaps")
    # the last matrix: nothing follows it but the end of the file
    tiny_gguf.write_bytes(tiny_gguf_bytes)
    patch(tiny_gguf, tensor_field_at(tiny_gguf, "output_norm.weight", "type"), "<I", Q.F16)
    refused(load(tiny_gguf), "follow the last tensor 'output_norm.weight'")


@pytest.mark.bad_input(kind="GGUF with NaN or inf weights (a norm, a quantized block's scale)",
                       gets="LlmlabError naming the tensor and counting the NaN and inf values")
def test_nan_and_inf_weights(tiny_gguf, tiny_gguf_bytes):
    patch(tiny_gguf, tensor_data_at(tiny_gguf, "blk.1.ffn_norm.weight") + 4 * 7, "<f", math.nan)
    refused(load(tiny_gguf), "'blk.1.ffn_norm.weight'", "1 NaN")
    tiny_gguf.write_bytes(tiny_gguf_bytes)
    patch(tiny_gguf, tensor_data_at(tiny_gguf, "blk.0.ffn_down.weight"), "<e", math.inf)   # a Q8_0 block scale
    refused(load(tiny_gguf), "'blk.0.ffn_down.weight'", "infinite")


@pytest.mark.bad_input(kind="GGUF rope theta <= 0, NaN or inf; rms eps < 0 or NaN",
                       gets="LlmlabError naming the metadata key, its value and the rule")
@pytest.mark.parametrize("key, value", [("llama.rope.freq_base", 0.0), ("llama.rope.freq_base", -1e4),
                                        ("llama.rope.freq_base", math.nan), ("llama.rope.freq_base", math.inf),
                                        ("llama.attention.layer_norm_rms_epsilon", -0.25),
                                        ("llama.attention.layer_norm_rms_epsilon", math.nan)])
def test_bad_rope_theta_and_rms_eps(tmp_path, key, value):
    path = write_tiny_gguf(tmp_path / "t.gguf", metadata={key: value})
    message = refused(load(path), f"the GGUF metadata's {key} is {value!r}", "finite number")
    assert ("RoPE" in message) == ("rope" in key)
    refused(lambda: cli.describe(str(path)), key)


@pytest.mark.bad_input(kind="GGUF model sizes missing, zero or of the wrong type (a string embedding length)",
                       gets="LlmlabError naming the metadata key")
@pytest.mark.parametrize("key, value, fragment", [
    ("llama.embedding_length", ("64", V.STRING), "is '64'"), ("llama.attention.head_count", 0, "is 0"),
    ("llama.block_count", 2**32 - 1, "from 1 to 100,000"), ("llama.feed_forward_length", None, "lacks"),
    ("llama.attention.head_count", 3, "must be divisible by n_heads (3)"),
    ("llama.attention.head_count", 64, "head_dim = dim // n_heads = 1 must be even")])
def test_bad_model_sizes(tmp_path, key, value, fragment):
    message = refused(load(write_tiny_gguf(tmp_path / "t.gguf", metadata={key: value})), fragment, "GGUF metadata")
    assert key in message or "n_heads" in message


@pytest.mark.bad_input(kind="GGUF vocabulary shorter than llama.vocab_size or the embedding rows",
                       gets="LlmlabError giving both sizes")
def test_short_vocabulary(tmp_path):
    short = {"tokenizer.ggml.tokens": TOKENS[:-10], "tokenizer.ggml.token_type": [1] * (VOCAB - 10)}
    refused(load(write_tiny_gguf(tmp_path / "a.gguf", metadata=short)), "252 tokens", "llama.vocab_size is 262")
    # no llama.vocab_size: the vocabulary sets the size, and the embedding has 10 rows too many
    no_size = {**short, "llama.vocab_size": None}
    refused(load(write_tiny_gguf(tmp_path / "b.gguf", metadata=no_size)), "'token_embd.weight' has shape (262, 64)",
            "implies (252, 64)")


@pytest.mark.bad_input(kind="GGUF bos or eos token id outside the vocabulary",
                       gets="LlmlabError naming the key, the id and the vocabulary size")
@pytest.mark.parametrize("name", ["bos", "eos"])
def test_special_ids_out_of_range(tmp_path, name):
    path = write_tiny_gguf(tmp_path / "t.gguf", metadata={f"tokenizer.ggml.{name}_token_id": 70000})
    refused(load(path), f"tokenizer.ggml.{name}_token_id is 70000", "262 tokens")


@pytest.mark.bad_input(kind="GGUF tokenizer metadata of the wrong type (numbers as tokens, a short token_type)",
                       gets="LlmlabError naming the tokenizer key")
@pytest.mark.parametrize("key, value, fragment", [
    ("tokenizer.ggml.tokens", (list(range(VOCAB)), V.ARRAY, V.UINT32), "tokens must be a list of str"),
    ("tokenizer.ggml.merges", (list(range(3)), V.ARRAY, V.INT32), "merges must be a list of str"),
    ("tokenizer.ggml.token_type", ([1] * 5, V.ARRAY, V.INT32), "token_type has 5 entries"),
    ("tokenizer.chat_template", (7, V.UINT32), "chat_template must be a string")])
def test_tokenizer_metadata_of_the_wrong_type(tmp_path, key, value, fragment):
    refused(load(write_tiny_gguf(tmp_path / "t.gguf", metadata={key: value})), fragment)


@pytest.mark.bad_input(kind="GGUF tensor whose shape disagrees with the metadata, or missing, or not a Llama weight",
                       gets="LlmlabError naming the tensor, its shape and the shape the config implies")
def test_tensor_shapes_that_disagree_with_the_metadata(tmp_path):
    wide = {"blk.1.ffn_up.weight": (np.zeros((FFN + 32, DIM), np.float32), Q.Q8_0)}
    refused(load(write_tiny_gguf(tmp_path / "a.gguf", tensors=wide)), "'blk.1.ffn_up.weight' has shape (160, 64)",
            "implies (128, 64)")
    refused(load(write_tiny_gguf(tmp_path / "b.gguf", tensors={"blk.1.ffn_up.weight": None})), "missing",
            "layers.1.mlp.w_up.weight")
    bias = {"blk.0.attn_q.bias": (np.zeros(DIM, np.float32), Q.F32)}
    refused(load(write_tiny_gguf(tmp_path / "c.gguf", tensors=bias)), "'blk.0.attn_q.bias' is not part of")


# --- unreadable files ---------------------------------------------------------------------------

@pytest.mark.bad_input(kind="GGUF path that is an empty file or a folder",
                       gets="LlmlabError naming the path: the file is empty / is a folder")
def test_empty_gguf_and_a_folder(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    refused(load(empty), str(empty), "the file is empty")
    refused(lambda: GGUFFile(tmp_path), str(tmp_path), "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="as root, a file without read permission is still readable")
@pytest.mark.bad_input(kind="model file without read permission",
                       gets="LlmlabError: cannot read the file (Permission denied)")
def test_gguf_without_read_permission(tiny_gguf):
    tiny_gguf.chmod(0)
    try:
        refused(load(tiny_gguf), str(tiny_gguf), "cannot read", "Permission denied")
    finally:
        tiny_gguf.chmod(0o644)


# --- Hugging Face folders -----------------------------------------------------------------------

def rewrite_weights(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def rewrite_json(path, change):
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


@pytest.mark.bad_input(kind="safetensors folder with int or bool weights",
                       gets="LlmlabError naming the file, the weight and its dtype: never cast to float")
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_int_and_bool_weights(folder, dtype):
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_weights(folder, lambda t: t.__setitem__(name, t[name].to(dtype)))
    stored = {torch.int32: "I32", torch.int8: "I8", torch.bool: "BOOL"}[dtype]
    refused(load(folder), "model.safetensors", repr(name), f"stored as {stored}")


@pytest.mark.bad_input(kind="safetensors weight shapes that disagree with config.json",
                       gets="LlmlabError naming the weight, its shape and the shape config.json implies")
def test_shapes_that_disagree_with_config_json(folder):
    rewrite_json(folder / "config.json", lambda c: c.__setitem__("intermediate_size", 96))
    refused(load(folder), str(folder), "'model.layers.0.mlp.down_proj.weight' has shape (64, 128)", "implies (64, 96)")


@pytest.mark.bad_input(kind="safetensors folder with NaN in a norm weight",
                       gets="LlmlabError naming the file and the weight")
def test_nan_norm_in_a_folder(folder):
    name = "model.layers.1.post_attention_layernorm.weight"
    rewrite_weights(folder, lambda t: t[name].__setitem__(3, math.nan))
    refused(load(folder), "model.safetensors", repr(name), "1 NaN")


@pytest.mark.bad_input(kind="config.json with NaN, negative, zero, string or missing values",
                       gets="LlmlabError naming config.json, the key and the rule")
@pytest.mark.parametrize("key, value, fragment", [
    ("rope_theta", math.nan, "is nan"), ("rope_theta", -1, "finite number > 0"), ("rms_norm_eps", -1e-6, ">= 0"),
    ("hidden_size", "64", "is '64'"), ("num_attention_heads", 0, "is 0"), ("vocab_size", None, "lacks vocab_size"),
    ("num_hidden_layers", 10**18, "from 1 to 100,000"), ("tie_word_embeddings", "yes", "true or false"),
    ("rope_parameters", "default", "must be an object"), ("llmlab_layer_heads", 4, "list of widths")])
def test_bad_config_json_values(folder, key, value, fragment):
    rewrite_json(folder / "config.json", lambda c: c.pop(key) if value is None else c.__setitem__(key, value))
    for action in (load(folder), lambda: cli.describe(str(folder))):
        refused(action, "config.json", fragment, *([key] if key != "llmlab_layer_heads" else []))


@pytest.mark.bad_input(kind="config.json, tokenizer.json or tokenizer_config.json that is cut short, empty, "
                            "invalid UTF-8, nested 100,000 deep, or a list instead of an object",
                       gets="LlmlabError naming the file: not valid JSON / must hold an object")
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text", ["{", "", "[" * 100_000, "\udcff", "[1, 2]"],
                         ids=["cut", "empty", "deep", "utf8", "list"])
def test_files_that_are_not_json_objects(folder, name, text):
    (folder / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    message = refused(load(folder), name)
    assert "not valid JSON" in message or text == "[1, 2]", message


@pytest.mark.bad_input(kind="tokenizer.json with a token id of 10^12, wrong types, or a vocabulary size "
                            "other than config.json's",
                       gets="LlmlabError naming tokenizer.json, in < 2 s and without allocating per id")
@pytest.mark.parametrize("change, fragment", [
    (lambda s: s["model"]["vocab"].__setitem__("Ġthe", 10**12), "reach id 1,000,000,000,000"),
    (lambda s: s["model"]["vocab"].__setitem__("Ġthe", "7"), "integer id"),
    (lambda s: s["model"].__setitem__("merges", [1, 2]), "merges"),
    (lambda s: s.__setitem__("added_tokens", [{"id": 0}]), "added_tokens"),
    (lambda s: s.__setitem__("pre_tokenizer", {"type": "Sequence", "pretokenizers": [1, 2]}), "pre-tokenizer"),
    (lambda s: s["model"]["vocab"].pop("Ġthe"), "261 tokens")])
def test_bad_tokenizer_json(folder, change, fragment):
    rewrite_json(folder / "tokenizer.json", change)
    refused(load(folder), "tokenizer.json", fragment)


@pytest.mark.bad_input(kind="safetensors file truncated, with a garbage header, a header that lies about offsets, "
                            "or a folder named model.safetensors",
                       gets="LlmlabError naming the file: not a readable safetensors file")
@pytest.mark.parametrize("damage", ["truncated", "garbage header", "offsets", "header length 2^60", "a folder"])
def test_damaged_safetensors(folder, damage):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8:8 + n])
    if damage == "truncated":
        data = data[:-100]
    elif damage == "garbage header":
        data = data[:8] + b"\xff" * n + data[8 + n:]
    elif damage == "offsets":       # the shape says half of what the offsets hold
        header["model.norm.weight"]["shape"] = [DIM // 2]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        data = struct.pack("<Q", len(text)) + text + data[8 + n:]
    elif damage == "header length 2^60":
        data = struct.pack("<Q", 2**60) + data[8:]
    path.unlink()
    path.mkdir() if damage == "a folder" else path.write_bytes(data)
    refused(load(folder), str(path), "not a readable safetensors file")


@pytest.mark.bad_input(kind="chat_template.jinja that is not UTF-8", gets="LlmlabError naming the file")
def test_chat_template_file_that_is_not_utf8(folder):
    (folder / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")
    refused(load(folder), "chat_template.jinja", "UTF-8")


@pytest.mark.bad_input(kind="Hugging Face folder with a booby-trapped pytorch_model.bin (a pickle that runs code)",
                       gets="the pickle is never unpickled: the safetensors load, or LlmlabError when there are none")
def test_a_pickle_is_never_loaded(folder, tmp_path):
    marker = tmp_path / "pwned"

    class Trap:
        def __reduce__(self):
            return open, (str(marker), "w")     # unpickling would create the marker file

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Trap()}))
    assert llmlab.load(folder).config.vocab_size == VOCAB
    cli.describe(str(folder))
    (folder / "model.safetensors").unlink()
    refused(load(folder), "*.safetensors")
    assert not marker.exists()
    pickle.loads((folder / "pytorch_model.bin").read_bytes())     # the trap is armed: this test could fail
    assert marker.exists()


@pytest.mark.bad_input(kind="model file holding a megabyte-long value where a number belongs",
                       gets="LlmlabError quoting the first 60 characters of it, not the megabyte")
def test_a_huge_value_is_not_echoed(tmp_path, folder):
    path = write_tiny_gguf(tmp_path / "t.gguf", metadata={"llama.rope.freq_base": ("x" * 2**20, V.STRING)})
    assert len(refused(load(path), "llama.rope.freq_base is 'xxxx", "...")) < 500
    rewrite_json(folder / "config.json", lambda c: c.__setitem__("rms_norm_eps", ["y"] * 2**18))
    assert len(refused(load(folder), "rms_norm_eps is ['y', ", "...")) < 500 + len(str(folder))
