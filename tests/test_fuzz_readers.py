"""Fuzzing the model-file readers: any damaged GGUF file or Hugging Face folder either loads or is
refused with an LlmlabError, within a time and a memory budget.

The inputs are mutations of the tiny model of test_hostile_files: in a GGUF file, flipped bytes,
counts and offsets overwritten with huge or boundary values, truncation; in a folder, config.json
values of every JSON type, mutated safetensors headers, truncated weights, mutated tokenizer files.
Each example goes through `llmlab.load` and, for GGUF, `llmlab info`'s `describe`.

Memory is bounded with RLIMIT_AS, which needs its own process: pytest runs this file as a script
(`python tests/test_fuzz_readers.py gguf`), which caps its address space at what it uses after
start-up plus MEMORY_BUDGET, so an allocation beyond it fails there as MemoryError (a failure of
the property) instead of swapping the machine. tracemalloc would see Python's and NumPy's
allocations but not PyTorch's, and it slows every allocation. Time is bounded per example by
hypothesis' deadline. Runs are derandomized, so CI sees the same inputs every time.
"""

import json
import shutil
import struct
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MEMORY_BUDGET = 2 * 2**30           # bytes of address space an example may add
SETTINGS = dict(deadline=timedelta(seconds=2), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GGUF_EXAMPLES, FOLDER_EXAMPLES = 1000, 600    # 8 s each on two idle cores, 25 s busy


def run_fuzzer(name: str) -> None:
    result = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]


@pytest.mark.bad_input(kind="fuzzed GGUF files: flipped bytes, counts and offsets set to huge or boundary "
                            "values, truncation",
                       gets="a clean load or an LlmlabError, each within 2 s and 2 GiB (hypothesis, derandomized)")
def test_fuzz_the_gguf_reader():
    run_fuzzer("gguf")


@pytest.mark.bad_input(kind="fuzzed Hugging Face folders: config.json values, safetensors headers, truncated "
                            "weights, tokenizer files",
                       gets="a clean load or an LlmlabError, each within 2 s and 2 GiB (hypothesis, derandomized)")
def test_fuzz_the_folder_reader():
    run_fuzzer("folder")


# --- what runs in the fuzzing process ----------------------------------------------------------

BOUNDARY = [0, 1, 2, 3, 31, 32, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1]


def loads_or_refuses(path: Path, describe: bool = False) -> None:
    import llmlab
    from llmlab import cli
    from llmlab.errors import LlmlabError

    for action in [lambda: llmlab.load(path)] + ([lambda: cli.describe(str(path))] if describe else []):
        try:
            action()
        except LlmlabError:
            pass


def gguf_fields(path: Path) -> list[tuple[int, str]]:
    """(offset, struct format) of every count, type and offset field, found by the `gguf` package's reader."""
    from gguf import GGUFReader

    reader, fields = GGUFReader(path), [(8, "<Q"), (16, "<Q"), (4, "<I")]
    for field in list(reader.fields.values())[3:]:           # the reader's first three are the header
        at = field.offset
        fields += [(at, "<Q"), (at + 8 + len(field.name.encode()), "<I")]
        value_at = at + 12 + len(field.name.encode())
        fields += [(value_at, "<I"), (value_at + 4, "<Q")] if len(field.types) > 1 else [(value_at, "<Q")]
    for tensor in reader.tensors:
        at = tensor.field.offset + 8 + len(tensor.name.encode())
        n_dims = len(tensor.shape)
        fields += [(tensor.field.offset, "<Q"), (at, "<I"), *((at + 4 + 8 * i, "<Q") for i in range(n_dims)),
                   (at + 4 + 8 * n_dims, "<I"), (at + 8 + 8 * n_dims, "<Q")]
    return fields


def gguf_mutations(size: int, fields: list) -> st.SearchStrategy:
    overwrite = st.tuples(st.just("field"), st.sampled_from(fields),
                          st.one_of(st.sampled_from(BOUNDARY), st.integers(0, 2**64 - 1)))
    flip = st.tuples(st.just("flip"), st.integers(0, size - 1), st.integers(1, 255))
    cut = st.tuples(st.just("cut"), st.integers(0, size - 1), st.just(0))
    return st.lists(st.one_of(overwrite, overwrite, flip, cut), min_size=1, max_size=4)


def mutate_gguf(data: bytes, mutations) -> bytes:
    data = bytearray(data)
    for kind, where, value in mutations:
        if kind == "field":
            at, fmt = where
            if at + struct.calcsize(fmt) <= len(data):
                struct.pack_into(fmt, data, at, value % 2 ** (8 * struct.calcsize(fmt)))
        elif kind == "flip" and where < len(data):
            data[where] ^= value
        elif kind == "cut":
            del data[where:]
    return bytes(data)


def fuzz_gguf(workdir: Path) -> None:
    from test_hostile_files import write_tiny_gguf

    good = write_tiny_gguf(workdir / "good.gguf")
    base, fields = good.read_bytes(), gguf_fields(good)
    path = workdir / "fuzzed.gguf"

    @settings(max_examples=GGUF_EXAMPLES, **SETTINGS)
    @given(gguf_mutations(len(base), fields))
    def fuzz(mutations):
        path.write_bytes(mutate_gguf(base, mutations))
        loads_or_refuses(path, describe=True)

    fuzz()


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from(BOUNDARY), st.integers(-2**70, 2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
SIZES = [0, 1, 16, 32, 64, 96, 128, 262]        # the tiny model's own sizes, and near them
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "XYZ"]


def folder_mutations(config_keys, tensor_names, tokenizer_keys, weights_size) -> st.SearchStrategy:
    config = st.tuples(st.just("config"), st.sampled_from(config_keys + ["head_dim", "rope_parameters"]),
                       st.one_of(JSON_VALUES, st.just("<delete>")))
    header = st.tuples(st.just("header"), st.sampled_from(tensor_names), st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(SAFETENSORS_DTYPES)),
        st.tuples(st.just("shape"), st.lists(st.sampled_from(SIZES + BOUNDARY), max_size=3)),
        st.tuples(st.just("shift"), st.sampled_from([-8, -4, -1, 1, 4, 8, 2**40, -2**40]))))
    cut = st.tuples(st.just("cut"), st.integers(0, weights_size - 1), st.none())
    tokenizer = st.tuples(st.just("tokenizer"), st.sampled_from(tokenizer_keys), JSON_VALUES)
    weighted = [config, config, config, header, header, tokenizer, tokenizer, cut]    # cut hides the rest
    return st.lists(st.one_of(*weighted), min_size=1, max_size=3)


def mutate_folder(folder: Path, mutations) -> None:
    for kind, where, value in sorted(mutations, key=lambda m: m[0] == "cut"):   # cut last: headers stay readable
        if kind == "config":
            config = json.loads((folder / "config.json").read_text())
            if value == "<delete>":
                config.pop(where, None)
            else:
                config[where] = value
            (folder / "config.json").write_text(json.dumps(config))
        elif kind == "header":
            path = folder / "model.safetensors"
            data = path.read_bytes()
            n = struct.unpack_from("<Q", data)[0]
            header = json.loads(data[8:8 + n])
            change, new = value
            if change == "shift":           # the tensor's bytes start and end elsewhere
                header[where]["data_offsets"] = [offset + new for offset in header[where]["data_offsets"]]
            else:
                header[where][change] = new
            text = json.dumps(header).encode()
            path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
        elif kind == "cut":
            path = folder / "model.safetensors"
            path.write_bytes(path.read_bytes()[:where])
        else:                      # a key of tokenizer.json's model, or of tokenizer_config.json
            file, key = where
            spec = json.loads((folder / file).read_text())
            (spec["model"] if file == "tokenizer.json" else spec)[key] = value
            (folder / file).write_text(json.dumps(spec))


def fuzz_folder(workdir: Path) -> None:
    from test_hostile_files import tiny_folder, write_tiny_gguf

    good = tiny_folder(workdir / "good", write_tiny_gguf(workdir / "tiny.gguf"))
    files = {f.name: f.read_bytes() for f in good.iterdir()}
    data = files["model.safetensors"]
    tensor_names = [k for k in json.loads(data[8:8 + struct.unpack_from("<Q", data)[0]]) if k != "__metadata__"]
    tokenizer_keys = [("tokenizer.json", "vocab"), ("tokenizer.json", "merges"), ("tokenizer_config.json", "bos_token"),
                      ("tokenizer_config.json", "eos_token"), ("tokenizer_config.json", "chat_template")]
    folder = workdir / "fuzzed"

    @settings(max_examples=FOLDER_EXAMPLES, **SETTINGS)
    @given(folder_mutations(sorted(json.loads(files["config.json"])), tensor_names, tokenizer_keys, len(data)))
    def fuzz(mutations):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
        mutate_folder(folder, mutations)
        loads_or_refuses(folder)

    fuzz()


def cap_memory(extra: int) -> None:
    import resource

    in_use = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))


if __name__ == "__main__":
    import torch

    import llmlab
    from test_hostile_files import write_tiny_gguf

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="llmlab-fuzz-"))
    try:
        llmlab.load(write_tiny_gguf(workdir / "warm.gguf"))     # start-up is not what the budget measures
        cap_memory(MEMORY_BUDGET)
        {"gguf": fuzz_gguf, "folder": fuzz_folder}[sys.argv[1]](workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
