"""llmlab.gguf against the `gguf` library's own dequantizers, and its errors on damaged files.

Exactness: our dequantizers do the same float32 arithmetic as the definition of each format, so the
results must be bit-for-bit equal to `gguf.quants.dequantize` (compared as uint32 bit patterns).
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf import quants

from llmlab.errors import LlmlabError
from llmlab.gguf import DEQUANTIZERS, GGUFFile, state_dict_from_gguf, unpermute_qk


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_every_tensor_of_the_shipped_file_matches_gguf_quants(gguf_path):
    ours = GGUFFile(gguf_path)
    reference = GGUFReader(gguf_path)
    assert len(reference.tensors) == 272
    seen_types = set()
    for t in reference.tensors:
        expected = quants.dequantize(t.data, t.tensor_type).reshape(ours.tensors[t.name].shape)
        np.testing.assert_array_equal(bits(ours.tensor(t.name)), bits(expected), err_msg=t.name)
        seen_types.add(t.tensor_type)
    assert seen_types == {T.Q4_1, T.Q8_0, T.F32}


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, T]], metadata: dict | None = None):
    """A small GGUF file holding the given float tensors, each quantized with the `gguf` library, and
    the metadata entries given as {key: (value, type[, element type])}."""
    writer = GGUFWriter(str(path), "llama")
    for key, spec in (metadata or {}).items():
        writer.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    for name, (values, qtype) in tensors.items():
        if qtype in (T.F32, T.F16):
            writer.add_tensor(name, values.astype(np.float32 if qtype == T.F32 else np.float16))
        else:
            data = quants.quantize(values, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", list(DEQUANTIZERS))
def test_synthetic_tensors_of_every_supported_type(tmp_path, qtype):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((6, 96)) * 3).astype(np.float32)
    values[0, :32] = 0.0              # an all-zero block: scale 0
    values[1, 5] = 1000.0             # an outlier inside a block
    write_gguf(tmp_path / "t.gguf", {"w": (values, qtype)})
    ours = GGUFFile(tmp_path / "t.gguf")
    reference = GGUFReader(tmp_path / "t.gguf").tensors[0]
    expected = quants.dequantize(reference.data, reference.tensor_type).reshape(6, 96)
    got = ours.tensor("w")
    assert ours.tensors["w"].type_name == qtype.name and got.shape == (6, 96)
    np.testing.assert_array_equal(bits(got), bits(expected))
    # and the round trip is close to what was written: 4-bit blocks keep ~1/15 of each block's range
    worst = {T.F32: 0, T.F16: 1e-3, T.BF16: 1e-2, T.Q8_0: 0.01, T.Q4_0: 0.2, T.Q4_1: 0.2}[qtype]
    assert np.abs(got - values)[2:].max() <= worst * np.abs(values).max()


def test_qk_rows_match_hugging_face_after_unpermuting(gguf_path, hf_model):
    file = GGUFFile(gguf_path)
    state = state_dict_from_gguf(file, n_heads=9, n_kv_heads=3)
    attn = hf_model.model.layers[7].self_attn
    torch.testing.assert_close(torch.from_numpy(state["layers.7.attention.wq.weight"]), attn.q_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(state["layers.7.attention.wk.weight"]), attn.k_proj.weight, rtol=0, atol=0)
    # without the unpermute they differ: the test would catch a missing or wrong permutation
    raw_q = torch.from_numpy(file.tensor("blk.7.attn_q.weight"))
    assert not torch.equal(raw_q, attn.q_proj.weight)


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's convert_hf_to_gguf.py permute(): reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)
    rng = np.random.default_rng(1)
    hf_weight = rng.standard_normal((3 * 64, 10)).astype(np.float32)
    llama_cpp = hf_weight.reshape(3, 2, 32, 10).swapaxes(1, 2).reshape(192, 10)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp, 3), hf_weight)


# --- damaged files: each a clear LlmlabError naming the file and the problem ----------------------

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.gguf"
    rng = np.random.default_rng(0)
    write_gguf(path, {"a": (rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0),
                      "b": (rng.standard_normal((4, 64)).astype(np.float32), T.F32)})
    return path


def expect_error(path, *fragments):
    with pytest.raises(LlmlabError) as info:
        f = GGUFFile(path)
        [f.tensor(name) for name in f.tensors]
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_wrong_magic(good_file):
    data = bytearray(good_file.read_bytes())
    data[:4] = b"GGML"
    good_file.write_bytes(bytes(data))
    expect_error(good_file, "not a GGUF file")


def test_truncated_in_the_header(good_file):
    good_file.write_bytes(good_file.read_bytes()[:40])
    expect_error(good_file, "truncated")


def test_truncated_in_the_tensor_data(good_file):
    good_file.write_bytes(good_file.read_bytes()[:-100])
    expect_error(good_file, "runs past the end of the file")


def test_tensor_offset_past_the_end(good_file):
    # Point tensor "b" far beyond the end by rewriting its offset field in the tensor directory.
    reader = GGUFReader(good_file)
    data = bytearray(good_file.read_bytes())
    old = int(reader.tensors[1].data_offset - reader.data_offset)   # offsets are stored relative to the data
    position = data.index(old.to_bytes(8, "little"), 0, reader.data_offset)
    data[position:position + 8] = (10**9).to_bytes(8, "little")
    good_file.write_bytes(bytes(data))
    expect_error(good_file, "'b'", "runs past the end of the file")


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "k.gguf"
    writer = GGUFWriter(str(path), "llama")
    q5k_block = 176                                              # bytes per 256 values in Q5_K
    writer.add_tensor("w", np.zeros((2, q5k_block), dtype=np.uint8), raw_shape=(2, q5k_block), raw_dtype=T.Q5_K)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    message = expect_error(path, "Q5_K", "supported")
    assert "Q4_1" in message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such GGUF file")


def test_garbage_after_magic(tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    expect_error(path)
