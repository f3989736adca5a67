"""The engine's switches, declared once: name, allowed values, default and what each means.

`load(...)`, the CLI's flags (`choices=`), `llmlab bench` and every JSON report read them from here,
so a switch is added, renamed or restricted in one place. Each switch changes *how* the engine
computes, never *what*: each is tested against the plain path (the defaults with compile off).

A leaf module: it imports nothing of the engine, so the engine's modules can import it. The modules
that implement a switch (attention.py's ATTENTION, kv_cache.py's make_cache, ...) are tested to
offer exactly the values listed here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import LlmlabError

FLOAT_WEIGHTS = ("fp32", "bf16", "fp16")
QUANTIZED_WEIGHTS = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (32, 64, 128, 256)   # what PyTorch's CPU int4 kernel accepts
# sparsity= values: "none", SCORE:S (each block linear loses a fraction S), magnitude-global:S (S of all
# of them together, by one threshold) or a 2:4 pattern (two of every four inputs kept)
SPARSITY_SCORES = ("magnitude", "wanda")
SPARSITY_PATTERNS = {"2:4": "wanda", "2:4-magnitude": "magnitude"}     # pattern -> the score it keeps by
SPARSITY_EXAMPLES = ("none", "magnitude:0.5", "magnitude-global:0.5", "wanda:0.5", "2:4", "2:4-magnitude")
# speculative= values: "none", prompt-lookup:K, or draft:SOURCE:K (SOURCE: anything load() reads); K tokens per guess
MAX_DRAFT_TOKENS = 16
SPECULATIVE_EXAMPLES = ("none", "prompt-lookup:4", "draft:student:half-depth:4")

# name -> (allowed values, or a type for free values: bool, int, or str for a text that its own parser
# checks (sparsity: parse_sparsity, speculative: parse_speculative); what the switch does)
SWITCHES = {
    "dtype": (FLOAT_WEIGHTS, "the dtype the model computes in (fp32 unless weights= says otherwise; "
                             "bf16 under quantized weights)"),
    "weights": (FLOAT_WEIGHTS + QUANTIZED_WEIGHTS, "how the linear layers' weights are stored"),
    "group_size": (INT4_GROUP_SIZES, "int4 only: how many inputs share one scale (default 32)"),
    "head": (("float", "int8"), "how the LM head's weights are stored: in the model's float dtype, or int8 with one "
                                "scale per output row (as llama.cpp's Q8_0 head of the shipped file), a copy of "
                                "the tied embedding: the embedding's lookups keep reading float rows"),
    "fused": (bool, "one matmul for q/k/v and one for gate/up per layer, over stacked weights"),
    "attention": (("naive", "sdpa", "triton"), "attention backend: the maths written out, PyTorch's "
                                               "SDPA, or llmlab's Triton FlashAttention and decode kernels"),
    "kernels": (("torch", "triton", "fused-decode", "int8-dot"),
                "RMSNorm (residual add fused), RoPE and SwiGLU: PyTorch ops or llmlab's Triton kernels; or "
                "fused-decode: the decode step as five Triton kernels per layer, each matrix-vector product with "
                "its neighbours fused in (norm, RoPE, cache write, SwiGLU, residual add), from float or int4 "
                "weights, prefill on PyTorch ops; "
                "or int8-dot (CPU, int4/int8 weights): the quantized matmuls of up to 16 tokens quantize their "
                "inputs to int8 per block of 32 and multiply with integer dot products (llmlab's C kernel, "
                "llmlab.quant.int8_dot, as llama.cpp's Q4_1 x Q8_1), the rest on PyTorch ops"),
    "kv_cache": (("static", "paged", "kv-int8", "kv-bf16", "kv-fp16"),
                 "KV cache layout: one preallocated buffer (in the model's dtype, or stored as int8 / "
                 "bf16 / fp16), or fixed-size blocks through a block table"),
    "compile": (("none", "default", "reduce-overhead", "max-autotune"),
                "torch.compile of the decode step (inductor: C++/OpenMP on CPU, Triton on GPU); "
                "reduce-overhead adds inductor's own CUDA graphs"),
    "cuda_graphs": (bool, "capture the decode step in a torch.cuda.CUDAGraph and replay it (CUDA only)"),
    "steps_per_graph": (int, "decode steps run per compiled call / graph replay, without the host "
                             "looking at the tokens in between (stop tokens are checked after each)"),
    "tp": (int, "tensor parallelism: split every layer over this many processes, one per GPU (NCCL) or CPU "
                "process (gloo), started by torchrun (llmlab.parallel); 1 runs on one device"),
    "sparsity": (str, "prune the blocks' linear weights to exact zeros, from the fp32 weights, before they are "
                      "fused or quantized: none; magnitude:S or wanda:S (S in [0, 1) of every layer, Wanda "
                      "calibrated on a training play); magnitude-global:S (one threshold over all layers); "
                      "2:4 (two of every four inputs kept, by Wanda score) or 2:4-magnitude"),
    "speculative": (str, "speculative decoding (llmlab.speculative), eager and batch 1: none; prompt-lookup:K (guess "
                         "K tokens by copying what followed the last n-gram earlier in the text) or draft:SOURCE:K "
                         f"(a smaller model load() reads, e.g. student:NAME, guesses K), K from 1 to {MAX_DRAFT_TOKENS}; "
                         "the model checks all K in one forward pass"),
}
MAX_STEPS_PER_GRAPH = 64
INT_RANGES = {"steps_per_graph": (1, MAX_STEPS_PER_GRAPH), "tp": (1, 64)}


def _describe(name: str) -> str:
    allowed = SWITCHES[name][0]
    if allowed is bool:
        return "True or False"
    if allowed is int:
        return "an integer from {} to {}".format(*INT_RANGES[name])
    if allowed is str:
        return "a text such as " + ", ".join({"sparsity": SPARSITY_EXAMPLES, "speculative": SPECULATIVE_EXAMPLES}[name])
    return "one of: " + ", ".join(map(str, allowed))


def _valid(name: str, value) -> bool:
    allowed = SWITCHES[name][0]
    if allowed is bool:
        return type(value) is bool                       # "no", 0 and None are not booleans
    if allowed is int:
        low, high = INT_RANGES[name]
        return type(value) is int and low <= value <= high
    if allowed is str:
        return type(value) is str                        # its own parser says what is wrong inside it
    return type(value) in (str, int) and value in allowed and type(value) is type(allowed[0])


@dataclass(frozen=True)
class EngineOptions:
    """Every switch of the engine. None for dtype/weights/group_size means "decide from the others"."""

    dtype: str | None = None
    weights: str | None = None
    group_size: int | None = None
    head: str = "float"
    fused: bool = True
    attention: str = "sdpa"
    kernels: str = "torch"
    kv_cache: str = "static"
    compile: str = "none"
    cuda_graphs: bool = False
    steps_per_graph: int = 1
    tp: int = 1
    sparsity: str = "none"
    speculative: str = "none"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if not _valid(f.name, value):
                raise LlmlabError(f"{f.name}={value!r} is not a valid choice; {f.name} takes {_describe(f.name)}")
        if self.group_size is not None and self.weights != "int4":
            raise LlmlabError(f"group_size is for weights='int4' only, not weights={self.weights!r}")
        if (self.weights in FLOAT_WEIGHTS and self.dtype is not None and self.dtype != self.weights):
            raise LlmlabError(f"weights={self.weights!r} and dtype={self.dtype!r} disagree: give only one of them")
        if self.graph_ready and self.attention == "triton":
            raise LlmlabError("compile, cuda_graphs and kernels='fused-decode' need attention='sdpa' or 'naive': "
                              "llmlab's Triton attention kernels read a cache of the current length, not a full "
                              "buffer under a mask")
        if self.graph_ready and self.kv_cache == "paged":
            raise LlmlabError("the paged KV cache stays eager (its block table grows on the host); use "
                              "kv_cache='static' with compile, cuda_graphs or kernels='fused-decode'")
        if self.kernels == "fused-decode":
            self._check_fused_decode()
        if self.kernels == "int8-dot":
            self._check_int8_dot()
        if self.compile == "reduce-overhead" and self.cuda_graphs:
            raise LlmlabError("compile='reduce-overhead' already captures CUDA graphs (inductor's); "
                              "use it or cuda_graphs=True, not both")
        if self.steps_per_graph > 1 and not self.graph_ready:
            raise LlmlabError("steps_per_graph > 1 runs several decode steps per compiled call or graph: "
                              "turn on compile or cuda_graphs as well (or kernels='fused-decode')")
        if self.tp > 1 and self.head != "float":
            raise LlmlabError("tp > 1 splits the LM head's rows over the ranks; an int8 head copy is not split: "
                              "use head='float' with tp")
        if self.tp > 1 and self.kv_cache == "paged":
            raise LlmlabError("tp > 1 shards the static KV cache by heads; use kv_cache='static' (or kv-int8, "
                              "kv-bf16, kv-fp16) with tp")
        parse_sparsity(self.sparsity)
        if self.sparsity != "none" and self.weights == "int4":
            raise LlmlabError("sparsity with weights='int4' would not stay sparse: int4 is asymmetric (each "
                              "group's grid starts at its minimum), so a pruned zero comes back as a small "
                              "non-zero; use weights='int8' or 'fp8' (symmetric: zero stays exact) or a float")
        if parse_speculative(self.speculative) is not None:
            self._check_speculative()

    def _check_fused_decode(self) -> None:
        if self.weights in ("int8", "fp8") or (self.weights != "int4" and not self.fused):
            raise LlmlabError("kernels='fused-decode' reads float weights stacked as [W_q; W_k; W_v] and "
                              "[W_gate; W_up], or int4 ones: use fused=True and a float weights= (fp32, bf16, "
                              "fp16), or weights='int4'")
        if self.weights == "int4" and self.tp > 1:
            raise LlmlabError("kernels='fused-decode' with weights='int4' runs on one device: use tp=1, or "
                              "float weights under tp")
        if self.head != "float":
            raise LlmlabError("kernels='fused-decode' reads the LM head in the model's float dtype: use head='float'")
        if self.kv_cache != "static":
            raise LlmlabError("kernels='fused-decode' writes the static KV cache in the model's dtype: use "
                              "kv_cache='static'")
        if self.compile != "none":
            raise LlmlabError("kernels='fused-decode' is already hand-fused Triton: torch.compile has nothing "
                              "left to fuse; use cuda_graphs=True to remove the launch overhead instead")

    def _check_int8_dot(self) -> None:
        if self.weights not in ("int4", "int8") and self.head != "int8":
            raise LlmlabError("kernels='int8-dot' multiplies int4 or int8 weights: use weights='int4' or 'int8' "
                              "(and/or head='int8')")
        if self.model_dtype != "bf16":
            raise LlmlabError(f"kernels='int8-dot' reads the weights' scales and the activations in bf16: use "
                              f"dtype='bf16' (the default under quantized weights), not {self.model_dtype!r}")
        if self.tp > 1:
            raise LlmlabError("kernels='int8-dot' runs on one CPU process: use tp=1 with it")

    def _check_speculative(self) -> None:
        # the verification pass rolls the cache back by writing over rejected positions from a smaller
        # Python-int start_pos: the eager path of one contiguous buffer
        if self.graph_ready:
            raise LlmlabError("speculative decoding runs the eager loop (its verification pass is k+1 tokens "
                              "wide and its length changes every step): turn off compile, cuda_graphs and "
                              "kernels='fused-decode' to use it")
        if self.tp > 1:
            raise LlmlabError("speculative decoding runs on one device: use tp=1 with it")
        if self.kv_cache != "static":
            raise LlmlabError(f"speculative decoding rolls its KV cache back by overwriting rejected positions in "
                              f"one contiguous buffer: use kv_cache='static' with it, not {self.kv_cache!r}")

    @property
    def graph_ready(self) -> bool:
        """Whether decoding runs through the fixed-shape step (compiled, captured or hand-fused)."""
        return self.compile != "none" or self.cuda_graphs or self.kernels == "fused-decode"

    @property
    def model_dtype(self) -> str:
        """The dtype the model computes in."""
        if self.weights in QUANTIZED_WEIGHTS:
            return self.dtype or "bf16"
        return self.weights or self.dtype or "fp32"

    def changed(self) -> dict:
        """The switches set away from their defaults: what names an engine in a report."""
        defaults = EngineOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)}

    def name(self, prefix: str = "llmlab") -> str:
        """A name that says every switch set away from the default, e.g. llmlab[weights=int8,kv_cache=kv-int8]."""
        changed = self.changed()
        return prefix + ("[" + ",".join(f"{k}={v}" for k, v in changed.items()) + "]" if changed else "")

    def as_dict(self) -> dict:
        return {**asdict(self), "model_dtype": self.model_dtype}


def check_sparsity(sparsity) -> None:
    """A fraction of weights to prune: 0 <= sparsity < 1 (1 would leave a layer with nothing)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise LlmlabError(f"sparsity must be a fraction in [0, 1), e.g. 0.5 for half the weights; got {sparsity!r}")


def parse_sparsity(spec: str) -> tuple[str, float, str] | None:
    """The sparsity switch as (score, fraction pruned, scope), or None for "none".

    "wanda:0.5" -> ("wanda", 0.5, "layer"); "magnitude-global:0.3" -> ("magnitude", 0.3, "global");
    "2:4" -> ("wanda", 0.5, "2:4"); "2:4-magnitude" -> ("magnitude", 0.5, "2:4").
    """
    if spec == "none":
        return None
    if spec in SPARSITY_PATTERNS:
        return SPARSITY_PATTERNS[spec], 0.5, "2:4"
    method, colon, fraction = spec.partition(":")
    score, scope = method.removesuffix("-global"), "global" if method.endswith("-global") else "layer"
    if not colon or score not in SPARSITY_SCORES:
        raise LlmlabError(f"sparsity={spec!r}: write none, magnitude:S, magnitude-global:S, wanda:S (S a fraction "
                          f"in [0, 1)), 2:4 or 2:4-magnitude")
    if (score, scope) == ("wanda", "global"):
        raise LlmlabError("sparsity='wanda-global:...' is not offered: Wanda compares |W_ij|·‖X_j‖ within each "
                          "output row (Sun et al. 2023), and scores of different layers are scaled by "
                          "different inputs, so one threshold across layers would not compare like with like; "
                          "use wanda:S (each layer, row by row) or magnitude-global:S")
    try:
        value = float(fraction)
    except ValueError:
        raise LlmlabError(f"sparsity={spec!r}: {fraction!r} is not a number; give a fraction such as 0.5") from None
    check_sparsity(value)
    return score, value, scope


def parse_speculative(spec: str) -> tuple[str, int] | None:
    """The speculative switch as (draft, K), or None for "none": draft is "prompt-lookup" or a model's
    source for load(). "prompt-lookup:4" -> ("prompt-lookup", 4); "draft:student:tiny:4" -> ("student:tiny", 4)."""
    if spec == "none":
        return None
    head, colon, k = spec.rpartition(":")       # K comes last: a SOURCE may hold colons (student:NAME)
    draft = "prompt-lookup" if head == "prompt-lookup" else head.removeprefix("draft:")
    if not colon or not (head == "prompt-lookup" or head.startswith("draft:") and draft):
        raise LlmlabError(f"speculative={spec!r}: write none, prompt-lookup:K or draft:SOURCE:K (SOURCE a model "
                          f"load() reads, such as student:NAME), K the tokens guessed per step")
    if not (k.isascii() and k.isdigit()) or not 1 <= int(k) <= MAX_DRAFT_TOKENS:
        raise LlmlabError(f"speculative={spec!r}: K must be an integer from 1 to {MAX_DRAFT_TOKENS}, not {k!r}")
    return draft, int(k)


def engine_options(**switches) -> EngineOptions:
    """EngineOptions from keyword switches, with a clear error for a name that is not a switch."""
    unknown = sorted(switches.keys() - SWITCHES.keys())
    if unknown:
        raise LlmlabError(f"unknown switch(es) {', '.join(unknown)}; the engine's switches are: {', '.join(SWITCHES)}")
    return EngineOptions(**switches)
