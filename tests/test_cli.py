"""`llmlab ...` run as a user runs it: a subprocess, its stdout, stderr and exit code.

Each call that generates loads the model (a few seconds), so there are few of them.
"""

import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from llmlab import cli
from llmlab.config import preset
from llmlab.options import SWITCHES, EngineOptions


def llmlab_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmlab.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_generate_greedy_matches_the_python_api(llm):
    prompt = "The capital of France is"
    result = llmlab_cli("generate", prompt, "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout == llm.generate(prompt, max_new_tokens=12) + "\n"


def test_generate_chat_wraps_the_prompt_as_one_user_message(llm):
    prompt = "What is the capital of France?"
    result = llmlab_cli("generate", prompt, "--chat", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == llm.chat([{"role": "user", "content": prompt}], max_new_tokens=16) + "\n"


def test_info_reports_what_the_file_holds(gguf_path):
    reader = GGUFReader(gguf_path)     # counted independently of llmlab's GGUF reader
    n_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    assert types == {"Q4_1": 210, "Q8_0": 1, "F32": 61}   # as TOOLCHAIN.md describes the file

    result = llmlab_cli("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"parameters: {n_params:,}" in out
    for name, count in types.items():
        assert f"{name}: {count}" in out
    assert f"file size: {gguf_path.stat().st_size:,} B" in out
    for field in ("vocab_size", "n_layers", "n_kv_heads", "ffn_dim", "rope_theta", "head_dim"):
        assert field in out
    assert re.search(rf"fp32 +{n_params * 4:,} B", out)      # 4 bytes a parameter
    assert re.search(rf"bf16 +{n_params * 2:,} B", out)
    assert "KV cache per token: fp32 46,080 B, bf16 23,040 B" in out  # 2 * 30 layers * 3 heads * 64 * bytes


def test_info_of_a_preset_needs_no_file():
    result = llmlab_cli("info", "--model", "preset:llama-3.2-1b")
    assert result.returncode == 0, result.stderr
    assert f"parameters: {preset('llama-3.2-1b').n_params():,}" in result.stdout
    assert "tensor types" not in result.stdout


def test_chat_answers_each_line_and_keeps_the_history(llm):
    questions = ["What is the capital of France?", "And of Germany?"]
    result = llmlab_cli("chat", "--max-new-tokens", "16", stdin="\n".join(questions) + "\n")
    assert result.returncode == 0, result.stderr
    history, expected = [], ""
    for q in questions:
        history.append({"role": "user", "content": q})
        reply = llm.chat(history, max_new_tokens=16)
        history.append({"role": "assistant", "content": reply})
        expected += "> " + reply + "\n"
    assert result.stdout == expected + "> \n"     # the last prompt, then the newline printed at EOF
    assert "Traceback" not in result.stderr


def test_chat_reset_forgets_and_exit_stops(llm):
    stdin = "Name a colour.\n/reset\nName a colour.\n/exit\nThis line is never read.\n"
    result = llmlab_cli("chat", "--max-new-tokens", "8", stdin=stdin)
    assert result.returncode == 0, result.stderr
    reply = llm.chat([{"role": "user", "content": "Name a colour."}], max_new_tokens=8)
    assert result.stdout == f"> {reply}\n> (conversation cleared)\n> {reply}\n> "


BAD_INPUTS = [
    (["generate", "hi", "--model", "preset:no-such-model"], "unknown preset"),
    (["generate", "hi", "--model", "/no/such/model.gguf"], "no such file"),
    (["generate", ""], "prompt is empty"),
    (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["generate", "hi", "--dtype", "fp8"], "invalid choice"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["info", "--model", "/no/such/model.gguf"], "no such file"),
    (["bench", "--runs", "0"], "runs"),
    (["generate", "hi", "--compile", "fast"], "invalid choice"),
    (["generate", "hi", "--steps-per-graph", "4"], "turn on compile"),
    (["bench", "--engine", "cuda_graphs=maybe"], "cuda_graphs takes true or false"),
    (["bench", "--weights", "fp32,int3"], "invalid choice 'int3'"),
    (["generate", "hi", "--sparsity", "wanda-global:0.5"], "is not offered"),
    (["generate", "hi", "--speculative", "prompt-lookup:0"], "K must be an integer from 1 to 16"),
    (["bench-serve", "--concurrency", "0"], "--concurrency takes requests in flight from 1 to 64"),   # its own flags
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["generate", "hi", "--device", "cuda"], "no CUDA GPU"))
    BAD_INPUTS.append((["generate", "hi", "--cuda-graphs"], "needs a CUDA device"))


@pytest.mark.bad_input(kind='a bad command-line flag or value (unknown preset, missing file, empty prompt, impossible switch)', gets='one error: line, exit 2, nothing on stdout')
@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_clear_error(args, message):
    result = llmlab_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and message in result.stderr
    assert result.stdout == ""


def subcommand(name: str):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    return commands.choices[name]


@pytest.mark.parametrize("command", ["generate", "chat", "bench"])
def test_every_switch_is_a_flag_with_the_registrys_values(command):
    """Derived from llmlab.options.SWITCHES, so a switch added there without a flag fails here."""
    flags = {flag: action for action in subcommand(command)._actions for flag in action.option_strings}
    for name, (allowed, _) in SWITCHES.items():
        flag = "--" + name.replace("_", "-")
        assert flag in flags, f"{name} has no flag {flag}"
        assert flags[flag].dest == name
        if allowed is bool:
            assert "--no-" + flag[2:] in flags
        elif allowed is int:
            assert flags[flag].type is int
        elif allowed is str:
            assert flags[flag].choices is None and flags[flag].metavar == "SPEC"     # checked by EngineOptions
        else:
            assert list(flags[flag].choices) == list(allowed)


def test_switch_flags_become_one_engine_options():
    args = cli.build_parser().parse_args(
        ["generate", "hi", "--weights", "int4", "--group-size", "64", "--no-fused", "--kv-cache", "kv-int8",
         "--compile", "max-autotune", "--steps-per-graph", "4", "--attention", "naive", "--dtype", "fp16"])
    assert EngineOptions(**cli.switches_given(args)) == EngineOptions(
        weights="int4", group_size=64, fused=False, kv_cache="kv-int8", compile="max-autotune", steps_per_graph=4,
        attention="naive", dtype="fp16")
    assert cli.switches_given(cli.build_parser().parse_args(["chat"])) == {}      # defaults: the engine's own


def test_bench_engines_from_specs_and_lists():
    args = cli.build_parser().parse_args(
        ["bench", "--dtype", "bf16", "--weights", "bf16,int8", "--engine", "compile=default,cuda-graphs=false,steps_per_graph=4",
         "--engine", "kv_cache=paged"])
    names = [options.name() for options in cli.bench_engines(args)]
    # a float weight format is its own dtype, so --dtype gives way there; int8 runs its activations in it
    assert names == ["llmlab[weights=bf16,compile=default,steps_per_graph=4]",
                     "llmlab[dtype=bf16,weights=int8,compile=default,steps_per_graph=4]",
                     "llmlab[weights=bf16,kv_cache=paged]", "llmlab[dtype=bf16,weights=int8,kv_cache=paged]"]
    plain = cli.bench_engines(cli.build_parser().parse_args(["bench", "--compile", "default"]))
    assert plain == [EngineOptions(compile="default")]
    sparse = cli.bench_engines(cli.build_parser().parse_args(
        ["bench", "--sparsity", "wanda:0.5", "--engine", "weights=int8", "--engine", "sparsity=2:4"]))
    assert [options.name() for options in sparse] == ["llmlab[weights=int8,sparsity=wanda:0.5]",
                                                      "llmlab[sparsity=2:4]"]


@pytest.mark.parametrize("spec, message", [
    ("compile", "write switches as name=value"),
    ("compiler=default", "unknown switch 'compiler'"),
    ("cuda_graphs=yes", "cuda_graphs takes true or false"),
    ("steps_per_graph=four", "steps_per_graph takes an integer"),
    ("compile=fast", "compile='fast' is not a valid choice"),
    ("steps_per_graph=4", "turn on compile or cuda_graphs"),
    ("compile=default,compile=none", "compile is given twice"),
    ("sparsity=magnitude:1.5", "sparsity must be a fraction in [0, 1)"),
    ("compile=none", "two engines are both llmlab"),          # the same as the first --engine below
])
@pytest.mark.bad_input(kind='a malformed llmlab bench --engine spec', gets='LlmlabError naming the switch and the form')
def test_bad_engine_specs_are_one_clear_error(spec, message, capsys):
    assert cli.main(["bench", "--engine", "kv_cache=static", "--engine", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
