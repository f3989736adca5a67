"""Speculative decoding against plain greedy decoding, batch 1, on real prompts: tok/s, the speed-up,
the draft's acceptance rate and tokens per verification pass (llmlab.speculative).

    python -m llmlab.bench.speculative [--spec prompt-lookup:4] [--new-tokens 128] [--runs 3] [--json PATH]

Each prompt is decoded greedily by the plain eager loop and by the speculative one, taking turns, after
a warm-up; the tokens must be the same (greedy speculative decoding is exact) or the run stops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..corpus import prompt_ids
from ..errors import LlmlabError
from ..llm import load, parse_device
from .report import device_name, versions, write_json


def prompts(tokenizer) -> dict[str, list[int]]:
    """Three kinds of text: a chat answer that repeats its question, Shakespeare, and a code edit."""
    return {
        "chat": tokenizer.encode_chat([{"role": "user", "content": "List the days of the week, then list them "
                                        "again in reverse order."}], add_generation_prompt=True),
        "shakespeare": prompt_ids(tokenizer, 256),
        "code-edit": tokenizer.encode("Rewrite this Python with the variable renamed from x to count:\n\nx = 0\n"
                                      "for item in items:\n    if item.ok:\n        x += 1\nprint(x)\n\nRewritten:\n"),
    }


def run(spec: str, new_tokens: int, runs: int, device: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    plain, fast = load(device=device), load(device=device, speculative=spec)
    results = {}
    for name, ids in prompts(plain.tokenizer).items():
        list(plain.generate_ids(ids, 8)), list(fast.generate_ids(ids, 8))          # warm-up
        seconds = {"plain": [], "speculative": []}
        for _ in range(runs):
            for label, llm in (("plain", plain), ("speculative", fast)):
                start = time.perf_counter()
                tokens = list(llm.generate_ids(ids, new_tokens, stop_ids=set()))
                seconds[label].append(time.perf_counter() - start)
                if label == "plain":
                    want = tokens
                elif tokens != want:
                    raise LlmlabError(f"{name}: speculative greedy tokens differ from plain greedy's")
        stats = fast.speculative_stats
        plain_s, fast_s = statistics.median(seconds["plain"]), statistics.median(seconds["speculative"])
        results[name] = {"prompt_tokens": len(ids), "plain_tok_s": new_tokens / plain_s,
                         "speculative_tok_s": new_tokens / fast_s, "speed_up": plain_s / fast_s,
                         "acceptance_rate": stats.acceptance_rate, "tokens_per_forward": stats.tokens_per_forward,
                         "seconds": seconds}
    return {"device": device_name(parse_device(device)), "threads": threads, "versions": versions(with_transformers=False),
            "speculative": spec, "new_tokens": new_tokens, "runs": runs, "results": results,
            "method": f"SmolLM2-135M-Instruct (fp32, the shipped weights), batch 1, greedy, {new_tokens} new tokens, "
                      f"no stop token; plain eager cached loop vs speculative={spec}, taking turns, {runs} runs each "
                      f"after an 8-token warm-up; medians; tokens checked identical every run"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="prompt-lookup:4")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    report = run(args.spec, args.new_tokens, args.runs, args.device, args.threads)
    for name, r in report["results"].items():
        print(f"{name:<12} plain {r['plain_tok_s']:6.1f} tok/s  speculative {r['speculative_tok_s']:6.1f} tok/s  "
              f"{r['speed_up']:.2f}x  acceptance {r['acceptance_rate']:.2f}  tokens/pass {r['tokens_per_forward']:.2f}")
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
