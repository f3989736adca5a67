"""The GGUF container read by hand: header, key/value metadata, tensor directory, tensor data.

    "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count times:      key (string) | value type u32 | value
    tensor_count times:  name (string) | n_dims u32 | n_dims dims u64 | ggml type u32 | offset u64
    padding to `general.alignment` (32 by default), then the tensors' bytes

A string is a u64 length and that many UTF-8 bytes; an array value is an element type u32, a length
u64 and the elements. Everything is little-endian.

Every count in a file is whatever its author wrote, and a hostile or damaged file can claim an array
of 2^40 strings or a name of an exabyte. So each count is checked against the bytes left in the file
before anything is allocated or looped over: a bad file costs at most one pass over its own bytes.
The tensor data must then be laid out as ggml's own reader requires, each tensor at the first aligned
offset after the one before it, which refuses overlaps, gaps, misaligned offsets and a relabelled type
(whose byte size no longer fits the next offset).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .config import shown
from .errors import LlmlabError

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)          # version 1 stored counts as u32; no model of interest uses it any more
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4               # GGML_MAX_DIMS: ggml tensors have at most 4 dimensions
SCALAR_FORMATS = {         # struct formats of the scalar value types
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?",
}
# The fewest bytes one entry can take, to bound a count before reading the entries it announces.
MIN_KV_BYTES = 8 + 4 + 1              # empty key, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str            # "Q4_1", "F32", ...
    shape: tuple[int, ...]    # PyTorch order: (rows, cols) = (out_features, in_features)
    n_bytes: int
    offset: int               # where its bytes start in the file


@dataclass(frozen=True)
class GGUFContents:
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data: mmap.mmap           # the whole file; TensorInfo.offset indexes it


def read_gguf(path: Path) -> GGUFContents:
    """The file's metadata and tensor directory, each checked against the file's own size."""
    data = _map(path)
    cursor = _Cursor(data, path)
    if cursor.take(4, "the magic number") != GGUF_MAGIC:
        raise LlmlabError(f"{path}: not a GGUF file (it starts with {bytes(data[:4])!r}, a GGUF file starts with "
                          f"{GGUF_MAGIC!r}). Is this the right file?")
    version = cursor.unpack("I", "the version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        raise LlmlabError(f"{path}: GGUF version {version}; llmlab reads versions {VERSIONS} in little-endian"
                          + (" (this file is big-endian)" if swapped in VERSIONS else "") + ".")
    n_tensors = cursor.unpack("Q", "the tensor count")
    n_kv = cursor.unpack("Q", "the metadata count")
    cursor.need(n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES,
                f"{n_kv:,} metadata entries and {n_tensors:,} tensors")
    metadata = {}
    for _ in range(n_kv):
        key = cursor.string("a metadata key")
        if key in metadata:
            raise cursor.error(f"metadata key {shown(key)} appears twice")
        metadata[key] = _value(cursor, key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.error(f"general.alignment is {shown(alignment)}; it must be a power of two")
    directory = [_tensor_entry(cursor) for _ in range(n_tensors)]
    tensors = _lay_out(directory, _align(cursor.pos, alignment), alignment, cursor)
    return GGUFContents(metadata, tensors, data)


def _map(path: Path) -> mmap.mmap:
    if path.is_dir():
        raise LlmlabError(f"{path} is a folder, not a GGUF file. Give the .gguf file inside it.")
    if not path.is_file():
        raise LlmlabError(f"{path}: no such GGUF file. Check the path, or call llmlab.load() for the bundled model.")
    try:
        with open(path, "rb") as f:
            if path.stat().st_size == 0:
                raise LlmlabError(f"{path}: the file is empty, not a GGUF file. Download it again.")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)   # the map outlives the handle
    except OSError as e:
        raise LlmlabError(f"{path}: cannot read the file ({e.strerror or e}).") from None


class _Cursor:
    """A read position in the file that refuses to move past its end."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def error(self, what: str) -> LlmlabError:
        return LlmlabError(f"{self.path}: {what}. The file is corrupt or truncated: download it again.")

    def need(self, n_bytes: int, what: str) -> None:
        left = len(self.data) - self.pos
        if n_bytes > left:
            raise self.error(f"reading {what} needs {n_bytes:,} bytes at offset {self.pos:,}, "
                             f"but only {left:,} bytes are left in the file")

    def take(self, n_bytes: int, what: str) -> bytes:
        self.need(n_bytes, what)
        self.pos += n_bytes
        return self.data[self.pos - n_bytes:self.pos]

    def unpack(self, fmt: str, what: str):
        return self.unpack_many(fmt, 1, what)[0]

    def unpack_many(self, fmt: str, count: int, what: str) -> list:
        layout = struct.Struct(f"<{count}{fmt}")
        self.need(layout.size, what)
        values = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return list(values)

    def string(self, what: str) -> str:
        length = self.unpack("Q", f"the length of {what}")
        # errors="replace": a stray byte shows as U+FFFD rather than failing the whole file
        return str(self.take(length, f"{what} of {length:,} bytes"), "utf-8", "replace")

    def strings(self, count: int, what: str) -> list[str]:
        # string() inlined: a vocabulary holds some 100,000 strings
        data, pos, end, out = self.data, self.pos, len(self.data), []
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, f"the length of string {i} of {what}")
            (length,) = U64.unpack_from(data, pos)
            pos += 8
            if length > end - pos:
                self.pos = pos
                self.need(length, f"string {i} of {what} ({length:,} bytes)")
            out.append(str(data[pos:pos + length], "utf-8", "replace"))
            pos += length
        self.pos = pos
        return out


def _value(cursor: _Cursor, key: str) -> Any:
    value_type = cursor.unpack("I", f"the type of metadata key {shown(key)}")
    if value_type == GGUFValueType.STRING:
        return cursor.string(f"metadata key {shown(key)}")
    if value_type in SCALAR_FORMATS:
        return cursor.unpack(SCALAR_FORMATS[GGUFValueType(value_type)], f"metadata key {shown(key)}")
    if value_type != GGUFValueType.ARRAY:
        raise cursor.error(f"metadata key {shown(key)} has value type {value_type}, which GGUF does not define")
    item_type = cursor.unpack("I", f"the element type of metadata key {shown(key)}")
    count = cursor.unpack("Q", f"the length of metadata key {shown(key)}")
    if item_type == GGUFValueType.STRING:
        cursor.need(count * 8, f"metadata key {shown(key)}: its {count:,} strings")
        return cursor.strings(count, f"metadata key {shown(key)}")
    if item_type in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[GGUFValueType(item_type)]
        cursor.need(count * struct.calcsize(fmt), f"metadata key {shown(key)}: its {count:,} values")
        return cursor.unpack_many(fmt, count, f"metadata key {shown(key)}")
    # ggml's reader refuses arrays of arrays too
    raise cursor.error(f"metadata key {shown(key)} is an array of value type {item_type}, which llmlab does not read")


def _tensor_entry(cursor: _Cursor) -> tuple[str, GGMLQuantizationType, list[int], int]:
    name = cursor.string("a tensor name")
    n_dims = cursor.unpack("I", f"the dimension count of tensor {shown(name)}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cursor.error(f"tensor {shown(name)} has {n_dims:,} dimensions; ggml tensors have 1 to {MAX_DIMS}")
    dims = cursor.unpack_many("Q", n_dims, f"the dimensions of tensor {shown(name)}")
    type_number = cursor.unpack("I", f"the type of tensor {shown(name)}")
    offset = cursor.unpack("Q", f"the offset of tensor {shown(name)}")
    try:
        ggml_type = GGMLQuantizationType(type_number)
    except ValueError:
        raise cursor.error(f"tensor {shown(name)} has type number {type_number}, which ggml does not define") from None
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    if 0 in dims or dims[0] % block_size:
        raise cursor.error(f"tensor {shown(name)} has dimensions {dims}: rows of {ggml_type.name} hold whole blocks of "
                           f"{block_size} values, and no dimension may be 0")
    return name, ggml_type, dims, offset


def _lay_out(directory, data_start: int, alignment: int, cursor: _Cursor) -> list[TensorInfo]:
    """TensorInfo for each directory entry, refusing any layout ggml's reader would refuse."""
    tensors, names, expected, previous = [], set(), 0, None
    file_size = len(cursor.data)
    for name, ggml_type, dims, offset in directory:
        if name in names:
            raise cursor.error(f"two tensors are named {shown(name)}")
        names.add(name)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = math.prod(dims) // block_size * type_size
        end = data_start + offset + n_bytes
        shape = tuple(reversed(dims))         # ggml lists the fastest-varying dimension first
        if end > file_size:
            raise cursor.error(f"tensor {shown(name)} ({ggml_type.name}, shape {shape}) runs past the end of the file "
                               f"(needs bytes up to {end:,}, the file has {file_size:,})")
        if offset != expected:
            raise cursor.error(_layout_problem(name, offset, expected, alignment, previous))
        tensors.append(TensorInfo(name, ggml_type.name, shape, n_bytes, data_start + offset))
        previous, expected = tensors[-1], _align(offset + n_bytes, alignment)
    if tensors:
        last_end = tensors[-1].offset + tensors[-1].n_bytes
        if file_size > _align(last_end, alignment):       # the writers pad the last tensor, or not
            raise cursor.error(f"{file_size - last_end:,} bytes follow the last tensor {shown(tensors[-1].name)}, "
                               f"which ends at {last_end:,}: a tensor's type or shape does not match its data")
    return tensors


def _layout_problem(name: str, offset: int, expected: int, alignment: int, previous: TensorInfo | None) -> str:
    if offset % alignment:
        problem = f"is not a multiple of the alignment, {alignment}"
    elif offset < expected:
        problem = "overlaps the tensor before it"
    else:
        problem = f"leaves a gap of {offset - expected:,} bytes"
    rule = ("the first tensor starts at 0" if previous is None else
            f"{shown(previous.name)} before it ({previous.type_name}, shape {previous.shape}) takes "
            f"{previous.n_bytes:,} bytes, so the next tensor starts at {expected:,}")
    return (f"tensor {shown(name)} starts at data offset {offset:,}, which {problem}: {rule}. "
            f"A tensor's offset or type is wrong")


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment
