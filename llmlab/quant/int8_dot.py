"""kernels="int8-dot": int4 and int8 weights times int8 activations, with the CPU's integer dot products.

PyTorch's CPU kernels multiply 4-bit weights by bf16 activations: every weight is widened to a float
before its multiply-add. llama.cpp decodes faster on the same CPU by quantizing the activations as
well, to int8 in blocks of 32 (its Q8_1), so that the inner loop multiplies small integers, 32 at a time
in one or two instructions (AVX2's vpmaddubsw; AVX-VNNI's vpdpbusd), and applies the two scales once per
block:

    y[n] = sum over blocks b of  s_w * d_x[b] * (q_w . q_x)[b]  +  o_w * d_x[b] * sum(q_x)[b]     (int4, W = q_w s_w + o_w)

(the offset term sums the *quantized* x, so that both terms are W . x_quantized: int8_dot.c says why).

The activations' rounding adds an error of at most d_x / 2 = max|x_b| / 254 per input: a small change
in the logits, measured in tests/test_int8_dot.py against PyTorch's matmul of the same dequantized
weights, and in perplexity by `llmlab eval`.

The kernels are ~250 lines of C (int8_dot.c), registered as two PyTorch operators by ~70 lines of C++
(int8_dot_op.cpp; torch.compile sees each call as one opaque node). Both are compiled at first use, for
this machine's CPU (-march=native: AVX-512 VNNI where there is one, else AVX2) and this PyTorch, with the
compilers on the PATH, and cached on disk (~10 s once). OpenMP threads follow torch.set_num_threads: the
library and PyTorch share one OpenMP runtime. The kernels serve up to DOT_ROWS tokens per call (decode, a
speculative check); a prefill is compute-bound and stays on PyTorch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from ..errors import LlmlabError

KERNELS = Path(__file__).with_name("int8_dot.c")            # the kernels, in C
OPERATORS = Path(__file__).with_name("int8_dot_op.cpp")     # their registration as PyTorch operators
DOT_ROWS = 16                  # above this many tokens a matmul is compute-bound: PyTorch's kernels do it
BLOCK = 32                     # inputs per activation scale, and the smallest weight group
# -march=native compiles for this CPU's best instructions. LLMLAB_MARCH builds for an older level instead
# (e.g. "haswell": AVX2 without VNNI), which is how the tests run the AVX2 path on an AVX-512 machine.
C_FLAGS = ["-O3", *f"-march={os.environ.get('LLMLAB_MARCH', 'native')}".split(), "-fopenmp", "-fPIC"]


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), which -march=native compiles for: part of the build's cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def check_supported() -> None:
    """Refuse, with the reason, where the kernel cannot run: it needs an x86-64 CPU with AVX2 and FMA."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise LlmlabError(f"kernels='int8-dot' is written for x86-64 CPUs (AVX2), not {platform.machine()}; "
                          f"use kernels='torch'")
    flags = cpu_flags().split()
    missing = [f for f in ("avx2", "fma") if f not in flags]
    if missing:
        raise LlmlabError(f"kernels='int8-dot' needs a CPU with AVX2 and FMA; this one lacks {', '.join(missing)}: "
                          f"use kernels='torch'")


def compilers() -> tuple[str, str]:
    """The C and C++ compilers: $CC and $CXX, else the first of cc/gcc/clang and c++/g++/clang++ on the PATH."""
    found = []
    for variable, names in (("CC", ("cc", "gcc", "clang")), ("CXX", ("c++", "g++", "clang++"))):
        name = next((n for n in (os.environ.get(variable), *names) if n and shutil.which(n)), None)
        if name is None:
            raise LlmlabError(f"kernels='int8-dot' compiles a small C/C++ kernel at first use and found no "
                              f"{'C' if variable == 'CC' else 'C++'} compiler ({', '.join(names)}) on the PATH: "
                              f"install one (e.g. `apt install g++`), set {variable}, or use kernels='torch'")
        found.append(name)
    return found[0], found[1]


def build_dir() -> Path:
    return Path(os.environ.get("LLMLAB_CACHE_DIR", Path.home() / ".cache" / "llmlab")) / "int8_dot"


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise LlmlabError(f"building the int8-dot kernel failed:\n{' '.join(command)}\n{result.stderr.strip()[-3000:]}\n"
                          f"use kernels='torch', or a gcc/g++ with OpenMP")


def build(path: Path, cc: str, cxx: str) -> None:
    """Compile the kernels (C, for this CPU) and their operators (C++, against this PyTorch) into `path`."""
    from torch.utils.cpp_extension import include_paths, library_paths
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:   # built aside, then moved: never half a file
        objects = Path(tmp) / "kernels.o"
        run([cc, *C_FLAGS, "-c", str(KERNELS), "-o", str(objects)])
        torch_lib = library_paths()[0]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
        built = Path(tmp) / path.name
        run([cxx, "-O2", "-std=c++17", "-w", "-shared", "-fPIC", "-fopenmp", abi,
             *(f"-I{d}" for d in include_paths()), str(OPERATORS), str(objects),
             f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}", "-o", str(built)])
        built.replace(path)


@cache
def library() -> Path:
    """Build int8_dot.c and int8_dot_op.cpp for this CPU and this PyTorch (once: cached on disk by the
    hash of the sources, compilers, CPU flags and torch version) and load them: torch.ops.llmlab.*."""
    check_supported()
    cc, cxx = compilers()
    versions = [subprocess.run([c, "--version"], capture_output=True, text=True).stdout for c in (cc, cxx)]
    key = hashlib.sha256("\n".join([KERNELS.read_text(), OPERATORS.read_text(), cc, cxx, *versions, cpu_flags(),
                                    torch.__version__, *C_FLAGS]).encode()).hexdigest()[:16]
    path = build_dir() / f"int8_dot-{key}.so"
    if not path.exists():
        build(path, cc, cxx)
    torch.ops.load_library(str(path))

    @torch.library.register_fake("llmlab::int4_int8_dot")   # shapes, for torch.compile's tracing
    def _(x, packed, scales, offsets, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("llmlab::int8_int8_dot")
    def _(x, weight, scale):
        return x.new_empty(x.shape[0], weight.shape[0])

    return path


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (M, K) times W^T, W (N, K) int4 in Int4Linear's form (packed, scales, offsets bf16) -> (M, N)."""
    library()
    return torch.ops.llmlab.int4_int8_dot(x, packed, scales, offsets, group_size)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) times W^T, W (N, K) = weight * scale[:, None] (Int8Linear's form, scale bf16) -> (M, N)."""
    library()
    return torch.ops.llmlab.int8_int8_dot(x, weight, scale)
