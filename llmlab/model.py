"""The Llama-family transformer: token embedding, then n_layers blocks of

    h = x + Attention(RMSNorm(x))        attention with RoPE positions and grouped-query heads
    x = h + MLP(RMSNorm(h))              SwiGLU feed-forward

then a final RMSNorm and the LM head (tied to the embedding in SmolLM2). One forward pass runs both
prefill (many tokens at once) and decode (one token), reading and extending a KV cache if given.
Each block is built with its own layer's widths (heads, KV heads, MLP channels), which differ from
layer to layer only in a structurally pruned model (llmlab.compress.structured).

Positions come in two forms (see llmlab.kv_cache): a Python int `start_pos`, the eager reference whose
shapes grow with the sequence, or a (batch,) tensor of each sequence's next position, the fixed-shape
path that torch.compile and CUDA graphs need: RoPE angles are then looked up in one precomputed table,
the cache is read whole, and attention masks what each sequence has not written.

A third form serves many requests at once (llmlab.serve.batch): the new tokens of several sequences
flattened into one row, `start_pos` a (1, seq) tensor of each token's own position, and as the cache
a batch object that knows which sequence each token belongs to. The matmuls cannot tell the
difference (they see a (1, seq, dim) row) and RoPE only reads the positions. The batch object writes
each token's keys and values into its sequence's blocks (`update`, as every cache does) and attends
each token to its own sequence only (`attend`, which no other cache has: Attention calls it in place
of the backend). So the model knows nothing of sequences or blocks.

Every stage is wrapped in a marker (`with stage("mlp"):`, llmlab.stages) that does nothing unless the
profiler listens.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTENTION
from .config import ModelConfig
from .errors import LlmlabError
from .kv_cache import KVCache
from .stages import stage


KERNELS = ("torch", "triton", "fused-decode", "int8-dot")


def triton_kernel(name: str):
    """The module llmlab.kernels.<name>, imported at first use: importing it starts Triton (and,
    without a GPU, its CPU interpreter), which a model running PyTorch's kernels never needs."""
    return importlib.import_module(f".kernels.{name}", __package__)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w   -- computed in fp32, as the reference does, whatever the dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":                      # one kernel: one read of x, one write of y
            return triton_kernel("rms_norm").rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of the angles m * theta_i, theta_i = theta^(-2i/d), for each position m.

    Returned as (len(positions), head_dim), each frequency repeated for both halves of the head.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]          # (seq, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)                      # (seq, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_table(config: ModelConfig, device, extra_positions: int = 0):
    """cos and sin for every position 0 .. max_seq_len + extra_positions - 1, in fp32: indexed by the
    position tensor on the fixed-shape path. The same numbers rope_cos_sin computes row by row."""
    positions = torch.arange(config.max_seq_len + extra_positions, device=device)
    return rope_cos_sin(positions, config.head_dim, config.rope_theta, torch.float32)


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """(batch, 1, q_len, kv_len) bool: True where query i of row b may see key j, key position <= query
    position. query_positions (batch, q_len); key_positions (batch or 1, kv_len). Reading a whole cache,
    the keys are its slots 0 .. max_seq_len-1: slots not yet written lie after every query, so the same
    rule hides them."""
    return key_positions[:, None, None, :] <= query_positions[:, None, :, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) by its angle: a position-dependent rotation of q and k."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention of layer `layer`, with that layer's head counts (a pruned model's
    layers may differ; every layer of an unpruned one is the same)."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.heads_of(layer), config.kv_heads_of(layer)
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.backend = "sdpa"
        self.kernels = "torch"
        # [W_q; W_k; W_v], set by Transformer.fuse_projections; a buffer so that .to() converts it too
        self.register_buffer("wqkv", None, persistent=False)

    def project_qkv(self, x):
        """x (batch, seq, dim) -> q (batch, heads, seq, head_dim), k and v (batch, kv_heads, seq, head_dim)."""
        batch, seq, _ = x.shape
        if self.wqkv is not None:
            # fused: one matmul over the stacked weights instead of three small ones (one pass, one call)
            q, k, v = F.linear(x, self.wqkv).split([self.wq.out_features, self.wk.out_features,
                                                    self.wv.out_features], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        return (q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2),
                k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2),
                v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2))

    def forward(self, x, cos, sin, layer: int, start_pos, cache: KVCache | None, mask=None):
        batch, seq, _ = x.shape
        with stage("qkv_projections"):
            q, k, v = self.project_qkv(x)
        with stage("rope"):
            if self.kernels == "triton":                      # rotate q and k in place, in one kernel each
                # strided views of the projection: no copy. The kernel takes one (seq, head_dim) table.
                table_cos, table_sin = (cos, sin) if cos.dim() == 2 else (cos[0, 0], sin[0, 0])
                triton_kernel("rope").apply_rope_(q, k, table_cos, table_sin)
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            with stage("kv_cache"):
                k, v = cache.update(layer, start_pos, k, v)
        with stage("attention_core"):
            if hasattr(cache, "attend"):       # a flattened batch: only it knows whose keys each token sees
                out = cache.attend(q, k, v, self.backend)
            else:
                out = ATTENTION[self.backend](q, k, v, mask)              # (batch, heads, seq, head_dim)
        with stage("output_projection"):
            return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU: W_down (silu(W_gate x) * W_up x), as wide as layer `layer`'s ffn_dim_of."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        ffn_dim = config.ffn_dim_of(layer)
        self.w_gate = nn.Linear(config.dim, ffn_dim, bias=False)
        self.w_up = nn.Linear(config.dim, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, config.dim, bias=False)
        self.register_buffer("w_gate_up", None, persistent=False)   # [W_gate; W_up], the same way
        self.kernels = "torch"

    def forward(self, x):
        if self.w_gate_up is not None:
            gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.w_gate(x), self.w_up(x)
        if self.kernels == "triton":                      # silu and the product in one pass
            return self.w_down(triton_kernel("swiglu").swiglu(gate.contiguous(), up.contiguous()))
        return self.w_down(F.silu(gate) * up)


def stack_rows(*linears: nn.Linear) -> torch.Tensor:
    """[W_1; W_2; ...] as one matrix, with each linear's weight re-pointed at its rows of it."""
    stacked = torch.cat([linear.weight.detach() for linear in linears])
    row = 0
    for linear in linears:
        n = linear.out_features
        linear.weight = nn.Parameter(stacked[row:row + n], requires_grad=False)
        row += n
    return stacked


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config, layer)

    def forward(self, x, cos, sin, layer, start_pos, cache, mask=None):
        with stage("norms"):
            normed = self.attn_norm(x)
        attended = self.attention(normed, cos, sin, layer, start_pos, cache, mask)
        if self.mlp_norm.kernels == "triton":
            with stage("norms"):     # the residual add fused into the norm: h = x + attended is written once
                normed, h = triton_kernel("rms_norm").rms_norm_residual(attended, x, self.mlp_norm.weight,
                                                                        self.mlp_norm.eps)
        else:
            with stage("residual"):
                h = x + attended
            with stage("norms"):
                normed = self.mlp_norm(h)
        with stage("mlp"):
            mixed = self.mlp(normed)
        with stage("residual"):
            return h + mixed


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.rope_cos = self.rope_sin = None     # the fixed-shape path's table, made by make_rope_table

    def make_rope_table(self, extra_positions: int = 0) -> None:
        """Precompute cos/sin for every position (plus `extra_positions` beyond the context, which a
        graph of several decode steps may run past the end into before the host sees a stop)."""
        self.rope_cos, self.rope_sin = rope_table(self.config, self.embed.weight.device, extra_positions)

    def set_attention(self, backend: str) -> None:
        """Switch every layer's attention: the maths written out ("naive"), PyTorch's SDPA, or llmlab's
        Triton FlashAttention and decode kernels ("triton")."""
        if backend not in ATTENTION:
            raise LlmlabError(f"unknown attention backend {backend!r}; choose one of: {', '.join(ATTENTION)}")
        for block in self.layers:
            block.attention.backend = backend

    def set_kernels(self, kernels: str) -> None:
        """Switch RMSNorm (with the residual add fused in), RoPE and SwiGLU between PyTorch's operations
        ("torch") and llmlab's Triton kernels ("triton"). The matmuls stay PyTorch's (cuBLAS).
        "fused-decode" leaves this forward on PyTorch's operations: llmlab.fused_decode replaces the
        decode step as a whole, and prefill runs here. So does "int8-dot", which changes the quantized
        linears' matmuls only (llmlab.quant.int8_dot, switched on by llmlab.quant.use_int8_dot)."""
        if kernels not in KERNELS:
            raise LlmlabError(f"unknown kernels {kernels!r}; choose one of: {', '.join(KERNELS)}")
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.kernels = kernels if kernels in ("torch", "triton") else "torch"

    def fuse_projections(self, fused: bool = True) -> None:
        """Switch between three q/k/v matmuls and two gate/up matmuls per layer (the plain path) and one
        of each over stacked weights. The maths is the same; on a small model's decode step, where each
        matmul is a short matrix-vector product, fewer and larger calls are faster. The separate
        linears are re-pointed at row slices of the stacked matrix, so both paths share one copy of
        the weights; `.to()` converts the two copies separately, so fuse again after it to share again."""
        for block in self.layers:
            attention, mlp = block.attention, block.mlp
            linears = (attention.wq, attention.wk, attention.wv, mlp.w_gate, mlp.w_up)
            if fused and not all(type(linear) is nn.Linear for linear in linears):
                raise LlmlabError("fuse_projections needs plain nn.Linear weights; fuse before quantizing, "
                                  "or use the unfused path with quantized weights")
            attention.wqkv = stack_rows(attention.wq, attention.wk, attention.wv) if fused else None
            mlp.w_gate_up = stack_rows(mlp.w_gate, mlp.w_up) if fused else None

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) at positions start_pos.. -> logits (batch, seq, vocab).

        start_pos: a Python int, the same for every row (the eager path), or a (batch,) tensor of each
        row's first position (the fixed-shape path: needs make_rope_table, reads the cache whole), or a
        (1, seq) tensor of each token's own position, for several sequences flattened into one row
        with a cache that attends (llmlab.serve.batch.PagedBatch).
        With last_only, only the last position goes through the LM head: during generation that is
        the only one we sample from, and the head is the largest matmul in the model. In a flattened
        row that is the last token of each sequence, which the cache names: logits (1, sequences, vocab).
        """
        flattened = isinstance(start_pos, torch.Tensor) and start_pos.dim() == 2
        if flattened and (tokens.shape[0] != 1 or not hasattr(cache, "attend")):
            raise LlmlabError("per-token positions (a 2-D start_pos) are for sequences flattened into one row: "
                              "give tokens of shape (1, seq) and a cache that attends them, "
                              "llmlab.serve.batch.PagedBatch (or use forward_batch)")
        seq = tokens.shape[1]
        with stage("embedding"):
            x = self.embed(tokens)                                       # (batch, seq, dim)
        with stage("rope"):
            if isinstance(start_pos, int):
                positions = torch.arange(start_pos, start_pos + seq, device=tokens.device)
                cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
                mask = None
            elif flattened:
                # the eager path's angles, at arbitrary positions: (seq, head_dim); the cache masks
                cos, sin = rope_cos_sin(start_pos[0], self.config.head_dim, self.config.rope_theta, x.dtype)
                mask = None
            else:
                if self.rope_cos is None:
                    raise LlmlabError("a tensor start_pos needs the RoPE table: call model.make_rope_table() first")
                positions = start_pos[:, None] + torch.arange(seq, device=tokens.device)   # (batch, seq)
                # (batch, 1, seq, head_dim): one row of angles per sequence, shared by its heads
                cos, sin = (table[positions].to(x.dtype)[:, None] for table in (self.rope_cos, self.rope_sin))
                keys_at = positions if cache is None else torch.arange(cache.max_seq_len, device=tokens.device)[None]
                mask = attention_mask(positions, keys_at)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, i, start_pos, cache, mask)
        with stage("norms"):
            x = self.norm(x)
        with stage("lm_head"):
            if last_only:
                x = x[:, cache.last_tokens] if flattened else x[:, -1:]
            return self.head(x)
