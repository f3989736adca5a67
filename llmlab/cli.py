"""`llmlab ...`: generate, chat, serve, info and bench from the command line.

    llmlab generate "The capital of France is" --max-new-tokens 16
    llmlab generate "Write a haiku about tea" --chat --temperature 0.7 --seed 1
    llmlab chat
    llmlab serve --port 8000           # OpenAI's API at http://127.0.0.1:8000/v1
    llmlab info --model preset:llama-3.2-1b
    llmlab bench --dtype bf16 --compare hf --json bench.json
    llmlab bench --dtype bf16 --engine compile=none --engine compile=default,steps_per_graph=4
    llmlab bench-serve --concurrency 1,4,16 --json serving.json     # llmlab.bench.serving: its flags are its own

Every engine switch (llmlab.options.SWITCHES) is a flag of generate, chat, serve and bench, made from the
registry: `--compile {none,default,...}`, `--cuda-graphs/--no-cuda-graphs`, `--steps-per-graph N`, ...
Bad input (a missing model, a corrupt or unreadable file, an impossible setting, text that is not
UTF-8) prints one `error: ...` line and exits with 2; in `chat`, a bad line is refused and the
conversation goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from . import validate
from .config import ModelConfig, config_from_gguf_metadata, preset
from .errors import LlmlabError
from .options import FLOAT_WEIGHTS, SWITCHES, EngineOptions, engine_options

LIST_SWITCHES = ("weights", "kv_cache")     # bench takes several of these, comma-separated: one engine each
BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2}


# --- generate and chat -------------------------------------------------------------------------

def sampling_kwargs(args) -> dict:
    """The sampling flags that were given, checked now, before minutes go into loading a model."""
    from .sampling import SamplingParams

    names = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"]
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    SamplingParams(**kwargs)
    return kwargs


def max_new_tokens(args, default: int) -> int:
    n = default if args.max_new_tokens is None else args.max_new_tokens
    if n < 1:
        raise LlmlabError(f"--max-new-tokens must be at least 1, got {n}")
    return n


def load_model(args):
    from .llm import load, parse_device

    options = engine_options(**switches_given(args))     # every switch checked before the model loads
    parse_device(args.device)   # fail fast on `--device cuda` without a GPU
    return load(args.model, device=args.device, **dataclasses.asdict(options))


def write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_generate(args) -> int:
    if not args.prompt:
        raise LlmlabError("the prompt is empty: give some text, e.g. llmlab generate \"Once upon a time\"")
    validate.text(args.prompt, "the prompt")     # bytes that are not UTF-8 arrive as lone surrogates
    max_new = max_new_tokens(args, 256 if args.chat else 64)
    sampling = sampling_kwargs(args)
    llm = load_model(args)
    if args.chat:
        pieces = llm.stream_chat([{"role": "user", "content": args.prompt}], max_new, **sampling)
    else:
        pieces = llm.stream(args.prompt, max_new, **sampling)
    for piece in pieces:
        write(piece)
    write("\n")
    return 0


def cmd_chat(args) -> int:
    max_new = max_new_tokens(args, 256)
    sampling = sampling_kwargs(args)
    llm = load_model(args)
    print(f"Chatting with {llm.source}. /reset forgets the conversation; /exit or Ctrl-D quits; "
          f"Ctrl-C stops a reply.", file=sys.stderr, flush=True)
    if hasattr(sys.stdin, "reconfigure"):
        # a line that is not valid UTF-8 is then read (with lone surrogates) and refused, rather than
        # ending the session with a UnicodeDecodeError
        sys.stdin.reconfigure(errors="surrogateescape")
    history: list[dict] = []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            validate.text(line, "that line")
        except LlmlabError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.stream_chat(history, max_new, **sampling):
                write(piece)
                reply.append(piece)
        except KeyboardInterrupt:
            pass                      # keep what was said so far, and go on with the conversation
        except LlmlabError as e:      # e.g. the conversation no longer fits the context
            history.pop()
            print(f"error: {e} (type /reset to start a new conversation)", file=sys.stderr, flush=True)
            continue
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(args) -> int:
    from .serve.engine import check_serve_options
    from .server import model_name, serve

    check_serve_options(engine_options(**switches_given(args)))     # refused before a model loads
    if args.token_budget < args.max_running:
        raise LlmlabError(f"--token-budget {args.token_budget} is smaller than --max-running {args.max_running}: a "
                          f"step must have room for one decode token of every running request")
    llm = load_model(args)
    serve(llm, args.host, args.port,
          on_ready=lambda url: print(f"llmlab serving {model_name(llm)} at {url}", file=sys.stderr, flush=True),
          max_running=args.max_running, kv_blocks=args.kv_blocks, block_size=args.block_size,
          token_budget=args.token_budget)
    return 0


def at_least_one(text: str) -> int:
    """argparse's type for a count: a whole number >= 1 (argparse then names the flag)."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


# --- info --------------------------------------------------------------------------------------

def describe(source: str | None) -> dict:
    """What `info` prints, read from metadata and the tensor directory: no weights are loaded."""
    from .llm import bundled_model_path

    if source is not None and str(source).startswith("preset:"):
        config = preset(str(source).removeprefix("preset:"))
        return {"source": str(source), "name": f"random weights of the {source[7:]} shape", "config": config,
                "n_params": config.n_params(), "file_bytes": None, "tensor_types": None}
    path = Path(source) if source is not None else bundled_model_path()
    if not path.exists():
        raise LlmlabError(f"{path}: no such file or folder. Give a .gguf file, a Hugging Face model folder, "
                          f"'preset:NAME', or nothing for the bundled SmolLM2")
    if path.is_dir():
        return _describe_hf_folder(path)
    from .gguf import GGUFFile

    file = GGUFFile(path)
    config = config_from_gguf_metadata(file.metadata)
    if "output.weight" in file.tensors:
        config = ModelConfig(**{**config.__dict__, "tie_embeddings": False})
    n_params = sum(_prod(t.shape) for t in file.tensors.values())
    return {"source": str(path), "name": file.metadata.get("general.name", path.stem), "config": config,
            "n_params": n_params, "file_bytes": file.file_size,
            "tensor_types": Counter(t.type_name for t in file.tensors.values())}


def _describe_hf_folder(path: Path) -> dict:
    from . import hf

    config_file = path / "config.json"
    weights = sorted(path.glob("*.safetensors"))
    if not config_file.is_file() or not weights:
        raise LlmlabError(f"{path}: a Hugging Face model folder needs config.json and *.safetensors")
    config = hf.read_config(path)
    types, n_params = Counter(), 0
    for file in weights:
        for dtype, shape in hf.tensor_headers(file).values():
            types[dtype] += 1
            n_params += _prod(shape)
    return {"source": str(path), "name": path.name, "config": config, "n_params": n_params,
            "file_bytes": sum(f.stat().st_size for f in weights), "tensor_types": types}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _size(n_bytes: int) -> str:
    return f"{n_bytes:>15,} B  ({n_bytes / 2**20:,.1f} MiB)"


def cmd_info(args) -> int:
    d = describe(args.model)
    config: ModelConfig = d["config"]
    fields = {**config.__dict__, "head_dim": config.head_dim}
    width = max(map(len, fields))
    lines = [f"model: {d['source']}", f"name: {d['name']}", "config:"]
    lines += [f"  {k:<{width}}  {v:g}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
              for k, v in fields.items()]   # :g shows the file's float32 1e-5 as 1e-05, not 9.99999974e-06
    lines.append(f"parameters: {d['n_params']:,} ({d['n_params'] / 1e6:.1f} M)")
    if d["file_bytes"] is not None:
        lines.append(f"file size: {d['file_bytes']:,} B ({d['file_bytes'] / 2**20:,.1f} MiB)")
    if d["tensor_types"]:
        counts = ", ".join(f"{t}: {n}" for t, n in d["tensor_types"].most_common())
        lines.append(f"tensor types: {counts} ({sum(d['tensor_types'].values())} tensors)")
    lines.append("weights in memory:")
    for dtype, size in BYTES_PER_VALUE.items():
        lines.append(f"  {dtype:<5} {_size(d['n_params'] * size)}")
    if d["file_bytes"] is not None:
        lines.append(f"  {'file':<5} {_size(d['file_bytes'])}   as stored, with its metadata")
    kv = {dtype: config.kv_cache_bytes(1, bytes_per_value=size) for dtype, size in BYTES_PER_VALUE.items()}
    lines.append("KV cache per token: " + ", ".join(f"{dtype} {n:,} B" for dtype, n in kv.items()))
    lines.append(f"KV cache at the full context ({config.max_seq_len:,} tokens): "
                 + ", ".join(f"{dtype} {n * config.max_seq_len / 2**20:,.1f} MiB" for dtype, n in kv.items()))
    print("\n".join(lines))
    return 0


# --- the engine's switches ----------------------------------------------------------------------

class CommaSeparated(tuple):
    """choices= for a flag that takes a comma-separated list: a list is a valid choice when each item is."""

    def __contains__(self, values) -> bool:
        return all(tuple.__contains__(self, v) for v in values)


def _comma_list(name: str):
    allowed = SWITCHES[name][0]

    def parse(text: str) -> tuple:
        values = tuple(type(allowed[0])(v) for v in text.split(","))
        wrong = [v for v in values if v not in allowed]
        if wrong:
            raise argparse.ArgumentTypeError(f"invalid choice {wrong[0]!r} (choose from {', '.join(map(str, allowed))}, "
                                             f"comma-separated)")
        return values
    return parse


def add_switch_flags(parser: argparse.ArgumentParser, lists: bool = False) -> None:
    """One flag per entry of SWITCHES, with its values and help; lists: LIST_SWITCHES take comma lists."""
    group = parser.add_argument_group("engine switches (llmlab.options.SWITCHES; default: the engine's own)")
    for name, (allowed, text) in SWITCHES.items():
        flag = "--" + name.replace("_", "-")
        if allowed is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif allowed is int:
            group.add_argument(flag, type=int, metavar="N", help=text)
        elif allowed is str:      # free text, checked by EngineOptions with its own parser's message
            group.add_argument(flag, metavar="SPEC", help=text)
        elif lists and name in LIST_SWITCHES:
            group.add_argument(flag, type=_comma_list(name), choices=CommaSeparated(allowed),
                               metavar="A,B,...", help=f"{text}; several, comma-separated: one engine each "
                                                     f"({', '.join(map(str, allowed))})")
        else:
            group.add_argument(flag, type=type(allowed[0]), choices=allowed, help=text)


def switches_given(args) -> dict:
    """The switch flags given on the command line (the others keep EngineOptions' defaults)."""
    return {name: getattr(args, name) for name in SWITCHES if getattr(args, name, None) is not None}


def switch_value(name: str, text: str, where: str):
    """A switch's value from text, by the switch's type: true/false, an integer, or the word itself."""
    allowed = SWITCHES[name][0]
    if allowed is bool:
        if text.lower() not in ("true", "false"):
            raise LlmlabError(f"{where}: {name} takes true or false, not {text!r}")
        return text.lower() == "true"
    if allowed is str:
        return text
    if allowed is int or isinstance(allowed[0], int):
        try:
            return int(text)
        except ValueError:
            raise LlmlabError(f"{where}: {name} takes an integer, not {text!r}") from None
    return text


def parse_engine_spec(spec: str, flag: str = "--engine") -> dict:
    """"compile=default,cuda_graphs=true,steps_per_graph=4" -> {"compile": "default", "cuda_graphs": True, ...};
    flag: the option it came from, for the error messages."""
    where, switches = f"{flag} {spec!r}", {}
    for item in spec.split(","):
        name, equals, text = (part.strip() for part in item.partition("="))
        name = name.replace("-", "_")
        if not equals or not name or not text:
            raise LlmlabError(f"{where}: write switches as name=value separated by commas, e.g. "
                              f"compile=default,cuda_graphs=true,steps_per_graph=4")
        if name not in SWITCHES:
            raise LlmlabError(f"{where}: unknown switch {name!r}; the switches are: {', '.join(SWITCHES)}")
        if name in switches:
            raise LlmlabError(f"{where}: {name} is given twice")
        switches[name] = switch_value(name, text, where)
    return switches


def with_base(base: dict, own: dict) -> dict:
    """An engine's switches: its own over the flags'. A float weight format is its own dtype and only
    int4 takes a group size, so where an engine names its weights, --dtype and --group-size give way."""
    switches = {**base, **own}
    if "weights" in own:
        if own["weights"] in FLOAT_WEIGHTS and "dtype" not in own:
            switches.pop("dtype", None)
        if own["weights"] != "int4" and "group_size" not in own:
            switches.pop("group_size", None)
    return switches


def bench_engines(args) -> list[EngineOptions]:
    """One EngineOptions per --engine SPEC (default: one engine of the flags alone), each once per value
    of the comma lists in --weights and --kv-cache."""
    base = switches_given(args)
    lists = {name: base.pop(name) for name in LIST_SWITCHES if name in base}
    engines = []
    for spec in args.engine or [None]:
        own = parse_engine_spec(spec) if spec is not None else {}
        for values in itertools.product(*lists.values()):
            listed = dict(zip(lists, values))
            try:
                engines.append(engine_options(**with_base(base, {**listed, **own})))
            except LlmlabError as e:
                raise LlmlabError(f"--engine {spec!r}: {e}" if spec is not None else str(e)) from None
    return engines


# --- bench -------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    from . import bench

    settings = bench.BenchSettings(args.prompt_tokens, args.new_tokens, args.runs, args.warmup, args.batch)
    engines = bench_engines(args)
    bench.check_engines(engines)
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir():
            raise LlmlabError(f"--json {args.json}: the folder {folder} does not exist")
    report = bench.run(args.model, engines=engines, device=args.device, threads=args.threads,
                       compare=args.compare, gpt_fast_dir=args.gpt_fast_dir, settings=settings,
                       contexts=_int_list(args.contexts, "--contexts"), roofline=args.roofline,
                       tokenizer=args.tokenizer, launches=args.launches, progress=bench.stderr_progress)
    print(bench.format_table(report))
    if args.json and os.environ.get("RANK", "0") == "0":      # under tp, every rank has the report: one writes it
        bench.write_json(report, args.json)
        print(f"\nwrote {args.json}")
    return 0


def _int_list(text: str | None, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",")) if text else ()
    except ValueError:
        raise LlmlabError(f"{flag} {text!r}: give whole numbers separated by commas, e.g. 128,512,2048") from None
    if any(v < 1 for v in values):
        raise LlmlabError(f"{flag} {text!r}: every length must be at least 1")
    return values


# --- eval --------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from .quant.evaluate import quality_table

    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise LlmlabError(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    if args.tokens < 2:
        raise LlmlabError(f"--tokens {args.tokens}: score at least 2 tokens (a context token and a predicted one)")
    if args.window < 2:
        raise LlmlabError(f"--window {args.window}: a window needs at least 2 tokens (a context token and a "
                          f"predicted one); 1024 is the default")
    report = quality_table(args.formats.split(","), n_tokens=args.tokens, window=args.window, device=args.device)
    print(f"{report['tokens']:,} tokens of {', '.join(report['held_out_plays'])}; reference: {report['reference']}")
    width = max(10, *map(len, report["results"]))
    print(f"{'format':<{width}} {'MB':>7} {'perplexity':>11} {'KL (nats)':>10} {'top-1':>7}")
    for name, r in report["results"].items():
        print(f"{name:<{width}} {r['model_bytes'] / 1e6:>7.1f} {r['perplexity']:>11.3f} {r['kl_divergence']:>10.5f} "
              f"{r['top1_agreement']:>7.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


# --- the parser --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="a .gguf file, a Hugging Face folder, or preset:NAME "
                                       "(default: the bundled SmolLM2-135M-Instruct)")
    model.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    switches = argparse.ArgumentParser(add_help=False)
    add_switch_flags(switches)

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-new-tokens", type=int, help="default 64 for generate, 256 for chat")
    sampling.add_argument("--temperature", type=float, help="0 (the default) is greedy")
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--min-p", type=float)
    sampling.add_argument("--repetition-penalty", type=float)
    sampling.add_argument("--seed", type=int)

    parser = argparse.ArgumentParser(prog="llmlab", description="A small, tested LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("generate", parents=[model, switches, sampling], help="continue a prompt, streaming the text")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--chat", action="store_true", help="send PROMPT as one user message through the chat template")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("chat", parents=[model, switches, sampling], help="talk with the model, turn by turn")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("serve", parents=[model, switches],
                            help="an OpenAI-compatible HTTP API for the model, many requests at once "
                                 "(continuous batching)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port, printed when ready")
    scheduling = p.add_argument_group("scheduling (llmlab.serve.scheduler)")
    scheduling.add_argument("--max-running", type=at_least_one, default=16, metavar="N",
                            help="requests decoded together at most; the others wait their turn (default 16)")
    scheduling.add_argument("--kv-blocks", type=at_least_one, metavar="N",
                            help="KV blocks in the pool, in the model's dtype (default: 512 tokens for each running "
                                 "request, and at least the context up to 8,192 tokens)")
    scheduling.add_argument("--block-size", type=at_least_one, default=16, metavar="N",
                            help="tokens per KV block (default 16)")
    scheduling.add_argument("--token-budget", type=at_least_one, default=256, metavar="N",
                            help="tokens one step runs at most: decodes first, then prompt chunks (default 256; "
                                 "at least --max-running)")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("info", help="the model's shape, size and memory, without loading its weights")
    p.add_argument("--model", help="a .gguf file, a Hugging Face folder, or preset:NAME (default: bundled SmolLM2)")
    p.set_defaults(func=cmd_info)

    p = commands.add_parser("bench", parents=[model], help="prefill and decode speed of engines and peers, in turns")
    add_switch_flags(p, lists=True)
    p.add_argument("--engine", action="append", metavar="SPEC",
                   help="an llmlab engine to measure, as switches over the flags above, e.g. "
                        "compile=default,cuda_graphs=true,steps_per_graph=4; repeat it for several engines "
                        "(the first is the baseline); each runs once per value of --weights/--kv-cache lists")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded side by side (graph-ready "
                                                        "engines and gpt-fast); tok/s counts every row")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed runs")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for every engine (default 2 on CPU)")
    p.add_argument("--compare", choices=["hf", "llamacpp", "gpt-fast"],
                   help="also measure a peer in the same rounds: Hugging Face transformers, llama.cpp on the same "
                        "GGUF (the [peers] extra), or gpt-fast on a GPU (see --gpt-fast-dir)")
    p.add_argument("--gpt-fast-dir", metavar="DIR", default="peers/gpt-fast",
                   help="where gpt-fast's model.py, generate.py and tokenizer.py were exported (default "
                        "peers/gpt-fast; llmlab/bench/gptfast.py says how)")
    p.add_argument("--tokenizer", action="store_true", help="also time encoding 1 MB of Shakespeare, llmlab vs HF")
    p.add_argument("--contexts", metavar="LENGTHS",
                   help="also decode after prompts of these lengths, e.g. 128,512,2048 (same engines, same turns)")
    p.add_argument("--roofline", action="store_true",
                   help="also measure peak FLOP/s and bandwidth, profile one generation and place each stage; "
                        "adds each engine's decode bandwidth as a fraction of the copy bandwidth")
    p.add_argument("--launches", action="store_true",
                   help="also count kernels and host launches per decode step of each llmlab engine")
    p.add_argument("--json", metavar="PATH", help="write the full report (every run, versions, method) here")
    p.set_defaults(func=cmd_bench)

    # listed here for `llmlab --help`; main hands its arguments to llmlab.bench.serving, which parses them
    commands.add_parser("bench-serve", add_help=False,
                        help="serving under load: the continuous-batching scheduler against one request at a time "
                             "and HF's static batches (llmlab bench-serve --help lists its flags)")

    p = commands.add_parser("eval", help="perplexity, KL and top-1 agreement of weight / KV formats against fp32")
    p.add_argument("--formats", default="fp32,bf16,fp16,int8,int4-g32,int4-g64,fp8,kv-int8",
                   help="comma-separated: fp32, bf16, fp16, int8, int4-gN, fp8, kv-int8 (an int8 KV cache); "
                        "more switches after '+': int4-g32+head=int8, fp32+sparsity=wanda:0.5")
    p.add_argument("--tokens", type=int, default=50_000, help="tokens of held-out Shakespeare (default 50,000)")
    p.add_argument("--window", type=int, default=1024, help="tokens per forward pass")
    p.add_argument("--json", metavar="PATH", help="write every number here")
    p.add_argument("--device", default="cpu", help="where every model runs: cpu or cuda")
    p.set_defaults(func=cmd_eval)
    return parser


def launch_ranks(n: int, argv: list[str]) -> int:
    """`llmlab generate|bench --tp N ...`: the same command again in N processes under torchrun, which
    stops them all when one fails. Rank 0 prints; the others' standard output is dropped."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "llmlab.cli", *argv]
    returncode = subprocess.run(command).returncode
    if returncode != 0:
        print(f"error: the {n} processes of --tp {n} stopped with exit code {returncode}: one of them failed (its "
              f"error is above; torchrun then stopped the others)", file=sys.stderr)
    return returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench-serve"]:
        from .bench import serving
        return serving.main(argv[1:], prog="llmlab bench-serve")
    args = build_parser().parse_args(argv)
    try:
        tp = getattr(args, "tp", None) or 1
        if tp > 1 and args.func is cmd_chat:
            raise LlmlabError("llmlab chat reads your turns in one process; --tp is for generate and bench")
        if tp > 1 and args.func is cmd_serve:      # before main would start one process per rank
            raise LlmlabError(f"llmlab serve runs in one process on one device, so --tp is 1, not {tp}: tensor "
                              f"parallelism is for generate and bench")
        if tp > 1 and "WORLD_SIZE" not in os.environ:
            return launch_ranks(tp, argv)
        if os.environ.get("RANK", "0") != "0":
            sys.stdout = open(os.devnull, "w")
        return args.func(args)
    except LlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:            # `llmlab generate ... | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:               # a file that exists but cannot be read: no permission, a folder, a device
        where = f"{e.filename}: " if e.filename else "reading or writing a file: "
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
