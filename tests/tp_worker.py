"""One rank of a tensor-parallel run, started by tests/test_parallel.py under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py MODE OUT [DEVICE]

Each rank saves what it computed to OUT/rank{R}.pt; the test compares those with a single process.
MODE: real (the real SmolLM2: logits and greedy tokens, eager, compiled and int8), fused (the hand-fused
decode step on a tiny model, against the sharded model's own forward), generate (a preset's greedy tokens
under the switches given after DEVICE), fail (rank 1 raises), stall (rank 1 sleeps past the timeout).
"""

import os
import sys
import time
from pathlib import Path

import torch

import llmlab
from llmlab import fused_decode, parallel
from llmlab.kv_cache import KVCache

PROMPT = "The quick brown fox jumps over the lazy dog. Tensor parallelism splits every layer"
NEW_TOKENS = 12


def real(out: dict) -> None:
    llm = llmlab.load(tp=2)
    ids = llm.tokenizer.encode(PROMPT)
    out["logits"] = llm.logits(ids)
    out["tokens"] = list(llm.generate_ids(ids, NEW_TOKENS))
    out["text"] = llm.generate(PROMPT, NEW_TOKENS)
    out["sampled"] = list(llm.generate_ids(ids, NEW_TOKENS, temperature=0.9, top_p=0.95, seed=7))
    out["compiled"] = list(llmlab.load(tp=2, compile="default", steps_per_graph=4).generate_ids(ids, NEW_TOKENS))
    int8 = llmlab.load(tp=2, weights="int8", dtype="fp32")
    out["int8_logits"] = int8.logits(ids)
    out["int8_tokens"] = list(int8.generate_ids(ids, NEW_TOKENS))
    out["int4_logits"] = llmlab.load(tp=2, weights="int4").logits(ids)


@torch.inference_mode()
def fused(out: dict, device: str) -> None:
    from llmlab.llm import random_model
    from test_fused_decode import TINY

    shard, dev = parallel.join(2, torch.device(device))
    model = parallel.shard_model(random_model(TINY, torch.float32, dev, seed=3), shard)
    model.fuse_projections(True)
    model.make_rope_table()
    prompt = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)).to(dev)
    caches = [KVCache(model.config, 64, batch=2, device=dev) for _ in range(2)]
    for cache in caches:
        model(prompt, start_pos=0, cache=cache)
    pos, token = torch.tensor([9, 9], device=dev), prompt[:, -1:]
    out["fused"] = fused_decode.decode_logits(model, token, pos, caches[0]).cpu()
    out["plain"] = model(token, start_pos=pos, cache=caches[1], last_only=True)[:, -1].cpu()
    out["prompt"], out["kv_heads"] = prompt.cpu(), [k.shape[1] for k in caches[0].keys]


def generate(out: dict, device: str, switches: list[str]) -> None:
    options = {name: _value(text) for name, _, text in (s.partition("=") for s in switches)}
    llm = llmlab.load("preset:smollm2-135m", device=device, tp=2, **options)
    ids = list(range(100, 164))
    out["tokens"] = list(llm.generate_ids(ids, 48, stop_ids=set()))


def _value(text: str):
    return {"true": True, "false": False}.get(text, int(text) if text.isdigit() else text)


def fail_or_stall(mode: str) -> None:
    llm = llmlab.load(tp=2)
    if llm.model.tensor_parallel.rank == 1:
        if mode == "fail":
            raise RuntimeError("rank 1 fails on purpose, before the first forward")
        time.sleep(600)                                        # stalls: rank 0 waits for it in a collective
    llm.generate("Hello", 8)


def main() -> None:
    mode, folder = sys.argv[1], Path(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    out: dict = {}
    if mode == "real":
        real(out)
    elif mode == "fused":
        fused(out, device)
    elif mode == "generate":
        generate(out, device, sys.argv[4:])
    else:
        fail_or_stall(mode)
    torch.save(out, folder / f"rank{torch.distributed.get_rank()}.pt")
    # Both ranks' results are saved. In the full CI run, a rank that had run Triton's CPU interpreter under
    # gloo twice aborted afterwards, in the interpreter's teardown ("terminate called without an active
    # exception"), its saved results correct: leave the group and exit without that teardown.
    parallel.leave()
    os._exit(0)


if __name__ == "__main__":
    main()
