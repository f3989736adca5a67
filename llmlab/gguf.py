"""Read a GGUF file: its metadata, its tensors, and llama.cpp's block formats turned back into floats.

The `gguf` library parses the container (header, key/value metadata, tensor directory). Turning the
raw bytes into numbers is done here, one small vectorised function per format, so you can read how
each format is laid out. `tests/test_gguf.py` checks every one against `gguf.quants.dequantize`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import LlmlabError

GGUF_MAGIC = b"GGUF"
QK = 32  # values per block in the Q8_0, Q4_0 and Q4_1 formats


# --- the block formats -------------------------------------------------------------------------
# Each takes the tensor's raw bytes as (rows, bytes_per_row) uint8 and returns (rows, cols) float32.
#
# In the quantized formats a row of K values is K/32 blocks laid end to end, each block holding its
# own fp16 scale (little-endian) and then its 32 quants: group-wise quantization along the inputs with
# groups of 32, in llmlab.quant's words. Q8_0 is symmetric int8 (w = d*q); Q4_0 symmetric int4
# (w = d*(q - 8): offset -8d); Q4_1 asymmetric int4 (w = d*q + m: scale d, offset m, the form
# llmlab.quant.Int4Linear stores). The 4-bit formats put values j and j+16 of a block in byte j,
# unlike llmlab.quant.pack_int4, which puts neighbouring columns 2j and 2j+1 in byte j.

def dequantize_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float32).copy()   # a copy: raw is a read-only map of the file


def dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an fp32: shift the 16 bits up and reinterpret.
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    # Block of 34 bytes: scale d (fp16), then 32 signed bytes q.  x = d * q
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 2 + QK)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)    # (rows, n_blocks, 1)
    q = blocks[..., 2:].view(np.int8).astype(np.float32)              # (rows, n_blocks, 32)
    return (q * d).reshape(rows, -1)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    # 16 bytes hold 32 values: low nibbles are values 0..15, high nibbles values 16..31.
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    # Block of 18 bytes: scale d (fp16), then 16 bytes of 4-bit q.  x = d * (q - 8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 2 + QK // 2)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    q = _unpack_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8)
    return (d * q.astype(np.float32)).reshape(rows, -1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    # Block of 20 bytes: scale d and minimum m (fp16 each), then 16 bytes of 4-bit q.  x = d * q + m
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 4 + QK // 2)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    q = _unpack_nibbles(blocks[..., 4:]).astype(np.float32)
    return (d * q + m).reshape(rows, -1)


DEQUANTIZERS = {
    GGMLQuantizationType.F32: dequantize_f32,
    GGMLQuantizationType.F16: dequantize_f16,
    GGMLQuantizationType.BF16: dequantize_bf16,
    GGMLQuantizationType.Q8_0: dequantize_q8_0,
    GGMLQuantizationType.Q4_0: dequantize_q4_0,
    GGMLQuantizationType.Q4_1: dequantize_q4_1,
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter gives `attn_q` / `attn_k`.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)...; Hugging Face rotates the two halves of
    each head (x_i, x_{i+d/2}). The converter interleaves each head's rows so llama.cpp's RoPE sees
    pairs; this puts them back, giving the Hugging Face `q_proj` / `k_proj`.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# --- the file ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str            # "Q4_1", "F32", ...
    shape: tuple[int, ...]    # PyTorch order: (rows, cols) = (out_features, in_features)
    n_bytes: int


class GGUFFile:
    """An opened GGUF file. `metadata` is a plain dict; `tensor(name)` dequantizes one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self.metadata = {key: _field_value(field) for key, field in self._reader.fields.items()}
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.tensors = {
            t.name: TensorInfo(t.name, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), int(t.n_bytes))
            for t in self._reader.tensors
        }
        self.file_size = self.path.stat().st_size

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored: (rows, bytes per row) uint8."""
        t = self._tensors[name]
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        return np.asarray(t.data).view(np.uint8).reshape(rows, -1)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in PyTorch order (rows, cols)."""
        t = self._tensors[name]
        dequantize = DEQUANTIZERS.get(t.tensor_type)
        if dequantize is None:
            supported = ", ".join(q.name for q in DEQUANTIZERS)
            raise LlmlabError(
                f"{self.path}: tensor {name!r} is stored as {t.tensor_type.name}, which llmlab does not "
                f"dequantize (supported: {supported}). Convert the model with llama.cpp's "
                f"`llama-quantize` to Q4_0, Q4_1, Q8_0 or F16."
            )
        return dequantize(self.raw(name)).reshape(self.tensors[name].shape)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values (str, int, float, bool, lists)."""
    return GGUFFile(path).metadata


def _open_reader(path: Path) -> GGUFReader:
    if not path.is_file():
        raise LlmlabError(f"{path}: no such GGUF file. Check the path, or call llmlab.load() for the bundled model.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LlmlabError(
            f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r}). "
            f"Is this the right file?"
        )
    try:
        return _CheckedReader(path)
    except _TensorPastEnd as e:
        raise LlmlabError(
            f"{path}: tensor {e.name!r} runs past the end of the file (needs bytes up to {e.end:,}, "
            f"the file has {size:,}). The file is truncated or corrupt: download it again."
        ) from None
    except Exception as e:  # the library fails in many ways on a damaged header; say what it means
        raise LlmlabError(
            f"{path}: the GGUF header is damaged or the file is truncated ({type(e).__name__}: {e}). "
            f"Download the file again."
        ) from None


class _TensorPastEnd(Exception):
    def __init__(self, name: str, end: int):
        self.name, self.end = name, end


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor lies inside the file before mapping it.

    The library would otherwise fail with a reshape error deep inside NumPy, which says nothing
    about the file being truncated.
    """

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            _, name, _, dims, raw_dtype, offset = field.parts
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
            end = int(start_offs) + int(offset[0]) + int(np.prod(dims)) * type_size // block_size
            if end > len(self.data):
                raise _TensorPastEnd(bytes(name).decode("utf-8", errors="replace"), end)
        super()._build_tensors(start_offs, fields)


def _field_value(field) -> Any:
    types = field.types
    if types and types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types and types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


# --- GGUF tensor names -> llmlab's module names ------------------------------------------------

_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "attn_q": "attention.wq.weight",
    "attn_k": "attention.wk.weight",
    "attn_v": "attention.wv.weight",
    "attn_output": "attention.wo.weight",
    "ffn_norm": "mlp_norm.weight",
    "ffn_gate": "mlp.w_gate.weight",
    "ffn_up": "mlp.w_up.weight",
    "ffn_down": "mlp.w_down.weight",
}


def state_dict_from_gguf(file: GGUFFile, n_heads: int, n_kv_heads: int) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under llmlab's names, Q/K rows back in Hugging Face order."""
    state = {}
    for name in file.tensors:
        w = file.tensor(name)
        if name == "token_embd.weight":
            state["embed.weight"] = w
        elif name == "output.weight":
            state["head.weight"] = w
        elif name == "output_norm.weight":
            state["norm.weight"] = w
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            if kind == "attn_q":
                w = unpermute_qk(w, n_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, n_kv_heads)
            if kind not in _LAYER_NAMES:
                raise LlmlabError(f"{file.path}: unexpected tensor {name!r} for a Llama-family model")
            state[f"layers.{layer}.{_LAYER_NAMES[kind]}"] = w
        else:  # e.g. rope_freqs (Llama 3.1's RoPE scaling): refuse rather than run it wrongly
            raise LlmlabError(f"{file.path}: tensor {name!r} is not part of a plain Llama model; llmlab cannot run this file")
    return state
