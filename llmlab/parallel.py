"""Tensor parallelism (load(tp=N)): every layer split across N processes, one per device, joined by all-reduces.

A decode step at batch 1 reads every weight once, so N devices that each hold 1/N of every matrix read
the step's bytes N times faster, if the pieces can be put back together cheaply. Megatron-LM's split
(Shoeybi et al. 2019) needs two all-reduces per layer:

    attention   W_q, W_k, W_v split by rows, whole heads per rank   (column-parallel: no communication)
                each rank attends with its own heads over its own slice of the KV cache
                W_o split by columns, the same heads                (row-parallel: partial sums)
                all-reduce: h = x + sum over ranks of W_o,r o_r
    MLP         W_gate, W_up split by rows (channels), W_down by the same columns; all-reduce
    embedding   the vocabulary's rows split: each rank looks up the tokens it holds, zeros elsewhere;
                all-reduce
    LM head     the same rows (tied): each rank scores its slice of the vocabulary; all-gather

Grouped-query attention is kept: a rank takes whole KV heads with all of their query heads, or, when
there are fewer KV heads than ranks, one KV head (copied to the ranks that share it) and its share of
that head's query heads. Counts that do not divide evenly are split as evenly as they go (SmolLM2's 3 KV
heads on 2 ranks: 2 and 1), so ranks may do unequal work; the answer is the same.

The model's code stays as it is: `shard_model` swaps smaller linears in from outside and adds the
all-reduces as forward hooks on Attention and MLP (their outputs are the row-parallel partial sums),
so quantizing the sharded linears afterwards (weights="int8" ...) keeps working. Each rank's config
records its own widths per layer (`layer_heads` ..., as a structurally pruned model's does), so the KV
cache it allocates holds its own heads only. The hand-fused decode step (llmlab.fused_decode) reads
`model.tensor_parallel` and puts the same collectives between its kernels.

The collectives are PyTorch's functional ones (torch.distributed._functional_collectives): traceable by
torch.compile and recorded into CUDA graphs, over NCCL between GPUs and gloo between CPU processes.
Processes are started by torchrun (`torchrun --nproc-per-node N`, or `llmlab generate --tp N`, which
starts it), which sets RANK, WORLD_SIZE and LOCAL_RANK and stops every process when one fails.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol

from .errors import LlmlabError
from .model import Transformer

# all_gather_single is all_gather_tensor's new name (PyTorch 2.13 deprecates the old one; 2.11 has only it)
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
TIMEOUT_ENV = "LLMLAB_TP_TIMEOUT"
TIMEOUT_SECONDS = 120      # a collective waiting longer means another rank failed or stalled
LAUNCH_HINT = "start one process per device with  torchrun --nproc-per-node {n} ...  (or  llmlab generate --tp {n} ...)"


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place in the group: rank r of world, and the process group the collectives use."""

    rank: int
    world: int
    group: dist.ProcessGroup

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks (every rank gets it)."""
        count("all_reduce", x)
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", self.group))

    def broadcast(self, value):
        """Rank 0's value (any picklable object) on every rank: rank 0 tokenizes, the others follow."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last dimension, in rank order."""
        count("all_gather", x)
        # gathered along the first dimension, then laid side by side: PyTorch 2.11's compiler cannot trace
        # a gather along another dimension
        stacked = funcol.wait_tensor(_all_gather(x.contiguous(), 0, self.group))
        return torch.cat(stacked.chunk(self.world), dim=-1)


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        raise LlmlabError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise LlmlabError(f"{TIMEOUT_ENV}={value!r}: give a positive number of seconds")
    return seconds


def join(world: int, device: torch.device) -> tuple[Shard, torch.device]:
    """Join the process group torchrun described in the environment (NCCL for CUDA, gloo for the CPU),
    with a timeout on every collective; return this process's Shard and its device (cuda:LOCAL_RANK)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise LlmlabError(f"tp={world} splits the model over {world} processes, and this is a single process: "
                          + LAUNCH_HINT.format(n=world))
    started = int(os.environ["WORLD_SIZE"])
    if started != world:
        raise LlmlabError(f"tp={world}, but torchrun started {started} processes: give --nproc-per-node {world}, "
                          f"or tp={started}")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LlmlabError(f"tp={world} needs {world} GPUs on this machine; PyTorch sees {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise LlmlabError(f"tp={world} runs on CUDA GPUs (NCCL) or CPU processes (gloo), not on {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
        atexit.register(leave)
    return Shard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD), device


def leave() -> None:
    """Leave the process group before the process exits (join registers it with atexit). Without it, gloo's
    threads were seen to abort the process at exit ("terminate called without an active exception"), and
    a process that captured NCCL collectives in CUDA graphs to hang at exit on two H200s."""
    if dist.is_initialized():
        dist.destroy_process_group()


def split(n: int, world: int, rank: int) -> range:
    """Rank's contiguous part of n items: sizes differ by at most one, the first ranks take the extra."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def head_ranges(n_heads: int, n_kv_heads: int, world: int, rank: int) -> tuple[range, range]:
    """The query heads and KV heads rank keeps, whole GQA groups where it can (see the module docstring)."""
    group = n_heads // n_kv_heads                     # query heads per KV head
    if n_kv_heads >= world:
        kv = split(n_kv_heads, world, rank)
        return range(kv.start * group, kv.stop * group), kv
    sharing = world // n_kv_heads                     # ranks that share one KV head
    if world % n_kv_heads or group % sharing:
        raise LlmlabError(f"tp={world} cannot split {n_heads} query heads over {n_kv_heads} KV heads: with fewer KV "
                          f"heads than ranks, the ranks must be a multiple of the KV heads and split each KV "
                          f"head's {group} query heads evenly; choose tp from 1..{n_kv_heads} or such a multiple")
    kv_head, part = divmod(rank, sharing)
    per_rank = group // sharing
    first = kv_head * group + part * per_rank
    return range(first, first + per_rank), range(kv_head, kv_head + 1)


def _rows(linear: nn.Linear, keep: range, width: int = 1) -> nn.Linear:
    """A linear with output rows keep[0]*width .. keep[-1]*width + width - 1 of `linear`."""
    return _linear(linear.weight[keep.start * width:keep.stop * width])


def _columns(linear: nn.Linear, keep: range, width: int = 1) -> nn.Linear:
    return _linear(linear.weight[:, keep.start * width:keep.stop * width])


def _linear(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)   # its own memory: the rest is freed
    return linear


def vocabulary_rows(table: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Rank's ceil(vocab / world) consecutive rows of a (vocab, dim) table, zero rows past its end."""
    rows = -(-table.shape[0] // shard.world)
    mine = table[shard.rank * rows:(shard.rank + 1) * rows]
    padded = torch.zeros(rows, table.shape[1], dtype=table.dtype, device=table.device)
    padded[:len(mine)] = mine
    return padded


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding table (padded to an equal count on every rank, so the head's
    all-gather is of equal pieces). A token outside them looks up zeros; the all-reduce fills it in."""

    def __init__(self, table: torch.Tensor, shard: Shard):
        super().__init__()
        self.weight = nn.Parameter(vocabulary_rows(table, shard), requires_grad=False)
        self.rows, self.start, self.shard = len(self.weight), shard.rank * len(self.weight), shard

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        mine = (local >= 0) & (local < self.rows)
        x = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine[..., None].to(self.weight.dtype)
        return self.shard.all_reduce(x)


class VocabParallelHead(nn.Module):
    """Logits for this rank's rows of the vocabulary, gathered into the whole vocabulary on every rank."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, shard: Shard):
        super().__init__()
        self.weight, self.vocab_size, self.shard = weight, vocab_size, shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather(F.linear(x, self.weight))

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        return self.shard.all_gather(local_logits)[..., :self.vocab_size]      # the padding rows dropped


def _sum_over_ranks(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return module.tensor_parallel.all_reduce(output)


@torch.no_grad()
def shard_model(model: Transformer, shard: Shard) -> Transformer:
    """Keep this rank's part of every weight, in place (float nn.Linear weights, before fusing or
    quantizing); return the model. Afterwards model.config holds this rank's widths per layer."""
    config = model.config
    model.fuse_projections(False)
    hd, heads, kv_heads, ffn_dims = config.head_dim, [], [], []
    for i, block in enumerate(model.layers):
        attention, mlp = block.attention, block.mlp
        q, kv = head_ranges(config.heads_of(i), config.kv_heads_of(i), shard.world, shard.rank)
        channels = split(config.ffn_dim_of(i), shard.world, shard.rank)
        if not len(channels):
            raise LlmlabError(f"tp={shard.world} leaves rank {shard.rank} no MLP channel of layer {i} "
                              f"({config.ffn_dim_of(i)} channels): use fewer ranks")
        attention.wq, attention.wk, attention.wv = _rows(attention.wq, q, hd), _rows(attention.wk, kv, hd), \
            _rows(attention.wv, kv, hd)
        attention.wo = _columns(attention.wo, q, hd)
        attention.n_heads, attention.n_kv_heads = len(q), len(kv)
        mlp.w_gate, mlp.w_up = _rows(mlp.w_gate, channels), _rows(mlp.w_up, channels)
        mlp.w_down = _columns(mlp.w_down, channels)
        for part in (attention, mlp):      # their outputs are this rank's partial sums
            part.tensor_parallel = shard
            part.register_forward_hook(_sum_over_ranks)
        heads.append(len(q)), kv_heads.append(len(kv)), ffn_dims.append(len(channels))
    untied_head = None if config.tie_embeddings else vocabulary_rows(model.head.weight, shard)
    model.embed = VocabParallelEmbedding(model.embed.weight, shard)
    head_weight = model.embed.weight if untied_head is None else nn.Parameter(untied_head, requires_grad=False)
    model.head = VocabParallelHead(head_weight, config.vocab_size, shard)
    model.config_before_sharding = config
    model.config = dataclasses.replace(config, layer_heads=tuple(heads), layer_kv_heads=tuple(kv_heads),
                                       layer_ffn_dims=tuple(ffn_dims))
    model.tensor_parallel = shard
    return model


def tensor_parallel_of(model: nn.Module) -> Shard | None:
    """The model's Shard, or None for a model on one device."""
    return getattr(model, "tensor_parallel", None)


# Bytes through each kind of collective while `counting()` is on (eager calls only: a compiled or
# captured step does not run this Python).
_counts: dict[str, int] | None = None


def count(kind: str, x: torch.Tensor) -> None:
    if _counts is not None and not torch.compiler.is_compiling():
        _counts[kind] = _counts.get(kind, 0) + x.numel() * x.element_size()


@contextlib.contextmanager
def counting():
    """Count the bytes each rank sends into collectives: `with counting() as sent: ...` -> {kind: bytes}."""
    global _counts
    _counts = {}
    try:
        yield _counts
    finally:
        _counts = None


def bytes_per_token(config, dtype_bytes: int, world: int) -> dict[str, int]:
    """What one decode step of one sequence puts into collectives on each rank, by formula: two
    all-reduces of the residual (dim values) per layer and one for the embedding, and this rank's slice
    of the vocabulary (padded to equal pieces) into the head's all-gather."""
    return {"all_reduce": (2 * config.n_layers + 1) * config.dim * dtype_bytes,
            "all_gather": -(-config.vocab_size // world) * dtype_bytes}
