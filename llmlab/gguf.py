"""Read a GGUF file: its metadata, its tensors, and llama.cpp's block formats turned back into floats.

llmlab.gguf_reader parses the container (header, key/value metadata, tensor directory), checking every
count and offset against the file. Turning the raw bytes into numbers is done here, one small
vectorised function per format, so you can read how each format is laid out. `tests/test_gguf.py`
checks every one against `gguf.quants.dequantize`.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from .config import config_from_gguf_metadata, shown
from .errors import LlmlabError
from .gguf_reader import TensorInfo, read_gguf  # noqa: F401  (TensorInfo: the type of GGUFFile.tensors)
from .weight_checks import check_finite, check_shapes

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

class GGUFFile:
    """An opened GGUF file. `metadata` is a plain dict; `tensor(name)` dequantizes one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        contents = read_gguf(self.path)
        self.metadata = contents.metadata
        self.tensors = {t.name: t for t in contents.tensors}
        self.file_size = len(contents.data)
        self._data = contents.data

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored: (rows, bytes per row) uint8, a read-only view of the file."""
        t = self.tensors[name]
        rows = math.prod(t.shape[:-1])
        return np.frombuffer(self._data, np.uint8, t.n_bytes, t.offset).reshape(rows, -1)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in PyTorch order (rows, cols)."""
        t = self.tensors[name]
        dequantize = DEQUANTIZERS.get(GGMLQuantizationType[t.type_name])
        if dequantize is None:
            supported = ", ".join(q.name for q in DEQUANTIZERS)
            raise LlmlabError(
                f"{self.path}: tensor {shown(name)} is stored as {t.type_name}, which llmlab does not "
                f"dequantize (supported: {supported}). Convert the model with llama.cpp's "
                f"`llama-quantize` to Q4_0, Q4_1, Q8_0 or F16."
            )
        return dequantize(self.raw(name)).reshape(t.shape)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values (str, int, float, bool, lists)."""
    return GGUFFile(path).metadata


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
    """Every tensor dequantized to float32 under llmlab's names, Q/K rows back in Hugging Face order.

    Refused before anything is dequantized: a tensor name or shape other than the metadata's config
    implies; and after, a tensor holding NaN or inf.
    """
    names = {_llmlab_name(file, name): name for name in file.tensors}      # llmlab's name -> the file's
    config = replace(config_from_gguf_metadata(file.metadata), tie_embeddings="head.weight" not in names)
    check_shapes({ours: file.tensors[theirs].shape for ours, theirs in names.items()}, config, file.path, names)
    state = {}
    for ours, theirs in names.items():
        w = file.tensor(theirs)
        check_finite(theirs, w, file.path)
        if ours.endswith("attention.wq.weight"):
            w = unpermute_qk(w, n_heads)
        elif ours.endswith("attention.wk.weight"):
            w = unpermute_qk(w, n_kv_heads)
        state[ours] = w
    return state


def _llmlab_name(file: GGUFFile, name: str) -> str:
    top = {"token_embd.weight": "embed.weight", "output.weight": "head.weight", "output_norm.weight": "norm.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    # e.g. rope_freqs (Llama 3.1's RoPE scaling), or biases: refuse rather than run it wrongly
    raise LlmlabError(f"{file.path}: tensor {shown(name)} is not part of a plain Llama model; "
                      f"llmlab cannot run this file")
