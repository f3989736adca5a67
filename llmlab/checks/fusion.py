"""Checks for the exercises of notebooks/08_fusion_and_graphs.ipynb.

check_geglu runs the reader's activation on fresh random inputs against PyTorch's own
F.gelu(approximate="tanh"), records the operations it runs to check their byte count (on the meta
device: nothing is computed), and compiles it with inductor to see that it becomes a single kernel.
check_greedy_step compares the reader's decode step with the fixed-shape reference on a small random
model, rows at different positions and a finished row among them, then compiles it with
torch.compile(fullgraph=True), which refuses any graph break. (torch._dynamo.explain would count the
breaks as well, but it resets every function the notebook compiled, and a break inside a Python loop
makes it skip the frame rather than report a break.)
"""

from __future__ import annotations

import copy
import re
from types import FunctionType

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import check, unanswered


class _Recorder(TorchDispatchMode):
    """Every ATen operation run inside it, as (name, bytes of full-size tensors read, bytes written).
    Views move no data and are left out; so are scalars and other tensors of another size than `numel`."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func is torch.ops.aten._unsafe_view.default):
            def moved(tree):
                return sum(t.nbytes for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.numel() == self.numel)
            self.ops.append((func.overloadpacket.__name__, moved((args, kwargs)), moved(out)))
        return out


def _fresh_copy(fn):
    """fn with a code object of its own, so that torch.compile traces it anew even if it compiled fn before."""
    return FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _generated_kernels(fn, *args) -> list[str] | None:
    """Names of the kernels inductor generates for fn(*args), or None where it cannot compile here."""
    from torch._inductor.utils import run_and_get_code
    try:
        _, codes = run_and_get_code(torch.compile(_fresh_copy(fn), fullgraph=True), *args)
    except Exception as error:                   # no C++ compiler, an unsupported platform, ...
        print(f"(inductor could not compile here, so the kernel count is skipped: {type(error).__name__})")
        return None
    return [name for code in codes for name in re.findall(r"^(\w*fused\w*) = ", code, re.MULTILINE)]


def first_graph_break(fn, *args) -> tuple[str | None, int]:
    """Compile fn with torch.compile(fullgraph=True), which refuses any graph break, and run it on args.
    Returns (None, graphs captured) if it is one graph, else (what stopped it and where, 0). The backend
    only counts graphs: nothing is generated, and nothing else compiled in the session is reset."""
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    try:
        torch.compile(_fresh_copy(fn), backend=count_graphs, fullgraph=True)(*args)
    except Exception as error:                   # Unsupported, or a guard on a value read from a tensor
        text = str(error)
        what = text.splitlines()[0]
        if "data-dependent" in what:            # int(t) or `if t:` on a value Dynamo could only guess
            what = "Python needs a value that is inside a tensor here (an int or a bool read from the device)"
        code = [line.strip() for line in text.split("from user code:")[-1].splitlines()[1:]]
        code = [line for line in code if line and not line.startswith("File") and set(line) - set("^~ ")]
        return f"  {what}" + (f"\n  at: {code[0]}" if "from user code:" in text and code else ""), 0
    return None, len(graphs)


@check
def check_geglu(geglu, geglu_bytes) -> None:
    """`geglu(gate, up)`: gelu_tanh(gate) * up written with elementwise PyTorch ops;
    `geglu_bytes(n, s)`: (bytes geglu moves run op by op, bytes one fused kernel must move) for
    inputs of n values of s bytes each."""
    gen = torch.Generator().manual_seed(8)
    probe = torch.randn(4, generator=gen)
    if unanswered(geglu(probe, probe), "geglu") or unanswered(geglu_bytes(4, 4), "geglu_bytes"):
        return
    for shape in [(3, 7), (64, 1536), (5,)]:
        gate, up = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)
        got, expected = geglu(gate, up), F.gelu(gate, approximate="tanh") * up
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape, (
            f"geglu of two {tuple(shape)} tensors must return one {tuple(shape)} tensor, got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
            hints = [(F.gelu(gate) * up, "that is the exact (erf) GELU: use the tanh approximation "
                                         "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"),
                     (F.gelu(up, approximate="tanh") * gate, "gate and up are swapped: the GELU goes on gate"),
                     (F.gelu(gate, approximate="tanh"), "multiply by up")]
            for wrong, hint in hints:
                if torch.allclose(got, wrong, rtol=1e-5, atol=1e-5):
                    raise AssertionError(f"shape {tuple(shape)}: {hint}")
            error = (got - expected).abs().max().item()
            raise AssertionError(f"shape {tuple(shape)}: geglu differs from F.gelu(gate, approximate='tanh') * up "
                                 f"by up to {error:.3g}; check the constants sqrt(2/pi) = 0.79788 and 0.044715")
    n = 512 * 1536                                   # a prefill of 512 tokens at SmolLM2's MLP width
    meta = [torch.empty(n, device="meta") for _ in range(2)]
    with _Recorder(n) as recorded:
        geglu(*meta)
    names = [name for name, _, _ in recorded.ops]
    assert not any("gelu" in name for name in names), (
        "geglu calls PyTorch's GELU: write it out with elementwise operations (tanh, multiplications, "
        "additions), the chain a compiler has to fuse")
    unfused, fused = geglu_bytes(n, 4)
    counted = sum(read + written for _, read, written in recorded.ops)
    listing = "\n".join(f"  {name:>8}: reads {read // 4:,} values, writes {written // 4:,}" for name, read, written in recorded.ops)
    assert unfused == counted, (
        f"geglu_bytes({n:,}, 4)[0] = {unfused:,}, but your geglu moves {counted:,} bytes run op by op "
        f"({len(recorded.ops)} operations, each reads its full-size inputs and writes its output; n = {n:,} values "
        f"of 4 bytes):\n{listing}")
    for s in (2, 4):
        assert geglu_bytes(n, s)[1] == 3 * n * s, (
            f"geglu_bytes({n:,}, {s})[1] = {geglu_bytes(n, s)[1]:,}: one fused kernel reads gate and up once "
            f"and writes the result once, 3 n s = {3 * n * s:,} bytes")
    kernels = _generated_kernels(geglu, torch.randn(64, 1536, generator=gen), torch.randn(64, 1536, generator=gen))
    if kernels is not None:
        assert len(kernels) == 1, (
            f"inductor made {len(kernels)} kernels of your geglu ({', '.join(kernels)}), not one: "
            f"keep to elementwise operations on gate and up")
    print(f"Correct: {len(recorded.ops)} operations move {counted / (4 * n):.0f} n s bytes run one by one, a fused kernel "
          f"3 n s: {counted / (3 * n * 4):.1f}x fewer" + (f"; inductor made one kernel of it: {kernels[0]}" if kernels else ""))


def _tiny_model():
    from ..config import ModelConfig
    from ..llm import random_model
    config = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                         tie_embeddings=False)
    model = random_model(config, torch.float32, torch.device("cpu"), seed=8)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():                        # weights of unit gain, so that attention changes the tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    model.make_rope_table()
    return model


def _reference_step(model, cache, token, pos, stop_id):
    """The fixed-shape greedy step: every row at its own position, finished rows kept as they are."""
    logits = model(token, start_pos=pos, cache=cache, last_only=True)[:, -1]
    done = token[:, 0] == stop_id
    nxt = torch.where(done[:, None], token, logits.argmax(-1, keepdim=True))
    return nxt, pos + (~done).long()


@check
@torch.inference_mode()
def check_greedy_step(greedy_step) -> None:
    """`greedy_step(model, cache, token, pos, stop_id)`: token (batch, 1) at positions pos (batch,) -> (the
    next tokens (batch, 1), the next positions (batch,)); a row whose token is stop_id keeps it and its
    position. It must run as one graph: no graph breaks."""
    from ..kv_cache import KVCache
    model, stop_id = _tiny_model(), 2
    gen = torch.Generator().manual_seed(80)
    cache = KVCache(model.config, model.config.max_seq_len, batch=3)
    for buffer in cache.keys + cache.values:                                # what earlier steps wrote
        buffer.normal_(generator=gen)
    token = torch.randint(3, model.config.vocab_size, (3, 1), generator=gen)
    token[1, 0] = stop_id                                                   # row 1 has finished
    pos = torch.tensor([5, 9, 17])                                         # every row at its own position
    mine = copy.deepcopy(cache)
    answer = greedy_step(model, mine, token.clone(), pos.clone(), stop_id)
    if unanswered(answer, "greedy_step"):
        return
    assert isinstance(answer, tuple) and len(answer) == 2, "greedy_step returns two tensors: (next tokens, next positions)"
    got_token, got_pos = answer
    want_token, want_pos = _reference_step(model, cache, token, pos, stop_id)
    assert got_token.shape == want_token.shape and got_pos.shape == want_pos.shape, (
        f"shapes: tokens {tuple(got_token.shape)} and positions {tuple(got_pos.shape)}, expected "
        f"{tuple(want_token.shape)} and {tuple(want_pos.shape)}")
    assert got_token[1, 0] == stop_id and got_pos[1] == pos[1], (
        f"row 1 has finished (its token is stop_id = {stop_id}): it must keep stop_id and its position {int(pos[1])}; "
        f"got token {int(got_token[1, 0])} at position {int(got_pos[1])}")
    if not (torch.equal(got_token, want_token) and torch.equal(got_pos, want_pos)):
        raise AssertionError(
            f"rows at positions {pos.tolist()}: expected tokens {want_token[:, 0].tolist()} and positions "
            f"{want_pos.tolist()}, got {got_token[:, 0].tolist()} and {got_pos.tolist()}. Each row has its own "
            f"position: pass the position tensor itself as start_pos (the fixed-shape path), not a Python int")
    assert torch.allclose(mine.k, cache.k) and torch.allclose(mine.v, cache.v), (
        "the tokens are right but the cache is not: every row's new key and value go in at its own position")
    problem, graphs = first_graph_break(greedy_step, model, copy.deepcopy(cache), token.clone(), pos.clone(), stop_id)
    if problem:
        raise AssertionError(f"right answers, but not one graph: torch.compile(fullgraph=True) stops at a graph "
                             f"break:\n{problem}\nKeep the positions and the stop test on the device: torch.where "
                             f"instead of `if`, tensors instead of int() or .item()")
    assert graphs == 1, f"torch.compile captured {graphs} graphs, expected one"
    print("Correct: one graph, no breaks; the same tokens, positions and cache as the fixed-shape reference, "
          "for rows at different positions and a finished row.")
